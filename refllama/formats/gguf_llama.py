"""GGUF (llama.cpp) Llama checkpoints as the same config and WeightMap a Hugging Face folder gives.

The metadata becomes a config.json-shaped dict that LlamaConfig.from_dict validates (errors name the GGUF key);
the tensors are presented under their HF names, so `load_weight_map` applies the same strict checks. Two
conversions make the formats agree:

* llama.cpp's converter reorders the rows of q_proj and k_proj within each head, from HF's rotate-half
  layout (pairs (i, i + d/2)) to ggml's adjacent pairs (2i, 2i + 1): `w.reshape(H, 2, d/2, in).swapaxes(1, 2)`.
  We undo it exactly (`reshape(H, d/2, 2, in).swapaxes(1, 2)`), so one forward pass serves both formats.
* Llama 3.1-style RoPE scaling is baked into a `rope_freqs` tensor of per-frequency divisors; it is kept as
  `LlamaConfig.rope_freq_factors` and applied in rope.inv_freq, as llama.cpp does.

Quantized tensors are dequantized to float32, except those of the block types a backend asks to keep
(`keep_blocks`): those come back as `GGUFBlockWeight` over the mapped bytes (q/k rows reordered the same way).

Mixtral is a `llama` file with `llama.expert_count` / `llama.expert_used_count`: its router is
`blk.N.ffn_gate_inp` and its experts are stacked, `blk.N.ffn_{gate,up,down}_exps` (NumPy [E, I, hidden] and
[E, hidden, I]), or, in older files, one tensor per expert (`blk.N.ffn_gate.E`). Either way each expert is
presented as its own HF Linear (`block_sparse_moe.experts.E.w1` ...): a slice of the stacked tensor, so a
backend reading blocks in place touches only the experts a token chose.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np

from refllama.config import LlamaConfig
from refllama.errors import CheckpointError, ConfigError, brief
from refllama.formats import ggml_quants, hugepages
from refllama.formats.ggml_quants import GGMLType
from refllama.formats.gguf import GGUFFile
from refllama.formats.safetensors import TensorInfo, release_pages
from refllama.quant.gguf_blocks import GGUFBlockWeight

# HF config field <- GGUF key (prefixed by the architecture name)
CONFIG_KEYS = {
    "max_position_embeddings": "context_length",
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rope_theta": "rope.freq_base",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "head_dim": "attention.key_length",
    "vocab_size": "vocab_size",
}

TOKEN_KEYS = {"bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id",
              "pad_token_id": "tokenizer.ggml.padding_token_id"}

# GGUF tensor name -> HF tensor name (per-layer names without the "blk.N." / "model.layers.N." prefixes)
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
IGNORED = {"rope_freqs.weight"}  # read into the config, not a weight
_AS_STORED = (GGMLType.F32, GGMLType.F16, GGMLType.F64, GGMLType.I8, GGMLType.I16, GGMLType.I32, GGMLType.I64)
# Mixtral's expert projections (w1 gate, w3 up, w2 down) by GGUF name, stacked (_exps) or per expert (.E)
EXPERT_NAMES = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}
MOE = "block_sparse_moe"


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name of a GGUF Llama tensor name, or None if it is not one (or a stacked expert tensor)."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] == "ffn_gate_inp":
        return f"model.layers.{parts[1]}.{MOE}.gate.{suffix}"
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in EXPERT_NAMES \
            and parts[3].isdigit():
        return f"model.layers.{parts[1]}.{MOE}.experts.{parts[3]}.{EXPERT_NAMES[parts[2]]}.{suffix}"
    return None


def stacked_expert_names(gguf_name: str, experts: int) -> list[str] | None:
    """HF names of the expert slices of a stacked `blk.N.ffn_*_exps` tensor, in expert order, or None."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or not parts[2].endswith("_exps"):
        return None
    projection = EXPERT_NAMES.get(parts[2][:-len("_exps")])
    if projection is None:
        return None
    return [f"model.layers.{parts[1]}.{MOE}.experts.{e}.{projection}.{suffix}" for e in range(experts)]


def config_from_gguf(gguf: GGUFFile) -> LlamaConfig:
    m = gguf.metadata
    arch = m.get("general.architecture")
    if arch != "llama":
        raise ConfigError("general.architecture", f"expected 'llama', got {brief(arch)}", gguf.path)
    data: dict = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu"}
    for field, key in CONFIG_KEYS.items():
        if f"llama.{key}" in m:
            data[field] = _plain(m[f"llama.{key}"])
    if "head_dim" not in data and "llama.rope.dimension_count" in m:
        data["head_dim"] = int(m["llama.rope.dimension_count"])
    if "vocab_size" not in data:
        tokens = m.get("tokenizer.ggml.tokens")
        if tokens is None and "token_embd.weight" not in gguf.tensors:
            raise CheckpointError("no llama.vocab_size, tokenizer.ggml.tokens or token_embd.weight to size the "
                                  "vocabulary", gguf.path)
        data["vocab_size"] = len(tokens) if tokens is not None else gguf.tensors["token_embd.weight"].shape[0]
    scaling = m.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        data["rope_scaling"] = {"rope_type": scaling, "factor": _plain(m.get("llama.rope.scaling.factor"))}
        if "llama.rope.scaling.original_context_length" in m:
            data["rope_scaling"]["original_max_position_embeddings"] = int(
                m["llama.rope.scaling.original_context_length"])
    names = set(gguf.tensors)
    data["tie_word_embeddings"] = "output.weight" not in names
    data["attention_bias"] = "blk.0.attn_q.bias" in names
    data["mlp_bias"] = "blk.0.ffn_up.bias" in names
    if "llama.expert_count" in m:  # Mixtral: an MoE MLP in every layer
        data.update({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                     "num_local_experts": _plain(m["llama.expert_count"]),
                     "num_experts_per_tok": _plain(m.get("llama.expert_used_count"))})
    data["bos_token_id"] = _plain(m.get("tokenizer.ggml.bos_token_id"))
    # The stop set: eos plus the end-of-turn/end-of-message ids llama.cpp also stops on.
    eos = [m[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                          "tokenizer.ggml.eom_token_id") if k in m]
    data["eos_token_id"] = list(dict.fromkeys(int(t) for t in eos))
    data["pad_token_id"] = _plain(m.get("tokenizer.ggml.padding_token_id"))
    matrix_types = Counter(t.ggml_type for t in gguf.tensors.values() if len(t.shape) == 2)
    main_type = matrix_types.most_common(1)[0][0] if matrix_types else GGMLType.F32
    data["torch_dtype"] = {GGMLType.F16: "float16", GGMLType.BF16: "bfloat16"}.get(main_type, "float32")
    if main_type not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.F64):
        data["quantization_config"] = {"quant_method": "gguf", "format": main_type.name}
    try:
        config = LlamaConfig.from_dict(data, source=gguf.path)
    except ConfigError as e:
        field = e.field.split(".")[0]
        keys = {**CONFIG_KEYS, "num_local_experts": "expert_count", "num_experts_per_tok": "expert_used_count"}
        key = f"llama.{keys[field]}" if field in keys else TOKEN_KEYS.get(field, e.field)
        raise ConfigError(key, e.message, gguf.path) from None
    if "rope_freqs.weight" in names:
        factors = gguf.get("rope_freqs.weight").astype(np.float64)
        if factors.shape != (config.head_dim // 2,) or not np.all((factors > 0) & np.isfinite(factors)):
            raise CheckpointError(f"expected {config.head_dim // 2} finite positive factors, got shape "
                                  f"{factors.shape}", gguf.path, "rope_freqs.weight")
        config = dataclasses.replace(config, rope_freq_factors=tuple(float(f) for f in factors))
    return config


def _plain(value):
    """Metadata scalars as Python numbers (float32 values keep their float32 rounding, as HF reads them)."""
    return value.item() if isinstance(value, np.generic) else value


class GGUFTensorSource:
    """A GGUF file's Llama tensors under HF names: dequantized to float32, Q/K rows back in HF order.

    Matrices stored in one of the `keep_blocks` types stay in their blocks, as `GGUFBlockWeight`.
    """

    def __init__(self, gguf: GGUFFile, config: LlamaConfig, keep_blocks: frozenset[GGMLType] = frozenset()):
        self.gguf, self.config, self.folder = gguf, config, gguf.path
        self.keep_blocks = keep_blocks
        self._arena = hugepages.Arena() if hugepages.available() else None  # for reordered q/k (`_hf_rows`)
        self._gguf_name: dict[str, str] = {}
        self._expert: dict[str, int] = {}  # HF name of an expert slice -> its index in the stacked tensor
        experts = config.moe.num_experts if config.moe is not None else 0
        unknown = []
        for name in gguf.tensors:
            hf = hf_name(name)
            sliced = stacked_expert_names(name, experts) if experts else None
            if hf is not None:
                self._gguf_name[hf] = name
            elif sliced is not None and gguf.tensors[name].shape[0] == experts:
                for e, expert_name in enumerate(sliced):
                    self._gguf_name[expert_name], self._expert[expert_name] = name, e
            elif name not in IGNORED:
                unknown.append(name)
        if unknown:
            raise CheckpointError("tensors that are not part of a Llama model: "
                                  f"{', '.join(brief(n) for n in sorted(unknown)[:8])}", gguf.path)

    def names(self) -> list[str]:
        return sorted(self._gguf_name)

    def info(self, name: str) -> TensorInfo:
        g = self.gguf.tensors[self._gguf_name[name]]
        stored = g.ggml_type.name
        # float and integer types as stored (an integer tensor is no float weight: load_weight_map refuses it);
        # block types (and BF16) come back as float32 or as blocks
        dtype = stored if g.ggml_type in _AS_STORED else "F32"
        shape, start, nbytes = g.shape, g.offset, g.nbytes
        if name in self._expert:  # one expert's slice of a stacked tensor
            shape, nbytes = g.shape[1:], g.nbytes // g.shape[0]
            start += self._expert[name] * nbytes
        return TensorInfo(name, dtype, shape, start, start + nbytes, Path(self.gguf.path))

    def get(self, name: str) -> np.ndarray | GGUFBlockWeight:
        gguf_name = self._gguf_name[name]
        info = self.gguf.tensors[gguf_name]
        shape, expert = info.shape, self._expert.get(name)
        if expert is not None:
            shape = info.shape[1:]
        if info.ggml_type in self.keep_blocks and len(shape) == 2:
            rows = self.gguf.raw(gguf_name).reshape(info.shape[0], -1)  # (out, bytes per row): blocks run along in
            if expert is not None:
                rows = rows.reshape(info.shape[0], shape[0], -1)[expert]  # this expert's rows of blocks (a view)
            return GGUFBlockWeight(self._hf_rows(gguf_name, rows), info.ggml_type, shape)
        if expert is None:
            return self._hf_rows(gguf_name, self.gguf.get(gguf_name))
        if info.ggml_type in (GGMLType.F32, GGMLType.F16, GGMLType.F64):
            return self.gguf.get(gguf_name)[expert]  # a view
        raw = self.gguf.raw(gguf_name).reshape(info.shape[0], -1)[expert]  # only this expert's blocks
        return ggml_quants.dequantize(raw, info.ggml_type, shape)

    def _hf_rows(self, gguf_name: str, array: np.ndarray) -> np.ndarray:
        """Q/K rows (of a float weight, a bias or rows of blocks) back in HF order; other tensors as they are.

        The reordered rows are a copy: the mapped pages of the stored order are let go once it is made, or they
        would stay resident beside it (Q and K are ~9% of a Llama's weights). A matrix's copy is made in huge pages
        (hugepages.py), as the numba backend does for the matrices it streams from the file: the model and the
        engine's kept source share it, and SmolLM2's float32 q/k/v matvecs of a decode step read it in 2.58-2.61 ms
        instead of 2.93 from 4 KiB pages (docs/numba.md). The arena is this source's own, so nothing else shares
        its chunks and pins them."""
        if ".attn_q." in gguf_name:
            heads = self.config.num_attention_heads
        elif ".attn_k." in gguf_name:
            heads = self.config.num_key_value_heads
        else:
            return array
        rows = _unpermute(array, heads)
        if not np.may_share_memory(rows, array):
            release_pages(array)
        if self._arena is not None and rows.ndim == 2 and rows.nbytes >= hugepages.MIN_BYTES:
            rows = self._arena.copy(rows)  # read-only, as the mapped tensors are
        return rows


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row reordering of q/k (weights [out, in] or biases [out])."""
    out = w.shape[0]
    half = out // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
