"""Hugging Face tensor names -> the spec's WeightMap, with strict key and shape checks.

Weights stay as they are stored (read-only memory-mapped views); converting them to the compute dtype is the
backend's job (`WeightMap.map`). A checkpoint whose tensors do not match the config fails here with every
missing, unexpected or misshapen tensor named, before any forward pass can run on a wrong model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from refllama.config import LlamaConfig
from refllama.errors import WeightError
from refllama.formats.safetensors import TensorSource

if TYPE_CHECKING:
    from refllama.gguf_llama import GGUFTensorSource

Array = Any  # a backend array: numpy.ndarray, cupy.ndarray, mlx.core.array

# Tensors some exporters write that carry nothing the model reads (recomputed from the config).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class Linear:
    """y = x @ weight.T + bias, with weight [out_features, in_features] as HF stores it."""

    weight: Array
    bias: Array | None = None


@dataclass
class AttentionWeights:
    q_proj: Linear  # [num_heads * head_dim, hidden]
    k_proj: Linear  # [num_kv_heads * head_dim, hidden]
    v_proj: Linear  # [num_kv_heads * head_dim, hidden]
    o_proj: Linear  # [hidden, num_heads * head_dim]


@dataclass
class MLPWeights:
    gate_proj: Linear  # [intermediate, hidden]
    up_proj: Linear  # [intermediate, hidden]
    down_proj: Linear  # [hidden, intermediate]


@dataclass
class LayerWeights:
    self_attention: AttentionWeights
    mlp: MLPWeights
    input_layernorm: Array  # [hidden]
    post_attention_layernorm: Array  # [hidden]


@dataclass
class WeightMap:
    embeddings: Array  # [vocab, hidden]  (model.embed_tokens.weight)
    layers: list[LayerWeights]
    final_norm: Array  # [hidden]          (model.norm.weight)
    lm_head: Array | None  # [vocab, hidden], None when tied to the embeddings

    def map(self, fn: Callable[[Array], Array]) -> WeightMap:
        """A new WeightMap with `fn` applied to every tensor (how a backend takes the weights in)."""
        return _map_tree(self, fn)

    def tensors(self) -> list[Array]:
        """Every tensor, in a fixed order (the order `map` visits them)."""
        out: list[Array] = []

        def collect(array: Array) -> Array:
            out.append(array)
            return array

        self.map(collect)
        return out


def _map_tree(node: Any, fn: Callable[[Array], Array]) -> Any:
    if node is None:
        return None
    if isinstance(node, list):
        return [_map_tree(item, fn) for item in node]
    if is_dataclass(node):
        return replace(node, **{f.name: _map_tree(getattr(node, f.name), fn) for f in fields(node)})
    return fn(node)


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint with this config must hold, by HF name, with its shape."""
    c = config
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    linears = {
        "self_attn.q_proj": ((q_out, c.hidden_size), c.attention_bias),
        "self_attn.k_proj": ((kv_out, c.hidden_size), c.attention_bias),
        "self_attn.v_proj": ((kv_out, c.hidden_size), c.attention_bias),
        "self_attn.o_proj": ((c.hidden_size, q_out), c.attention_bias),
        "mlp.gate_proj": ((c.intermediate_size, c.hidden_size), c.mlp_bias),
        "mlp.up_proj": ((c.intermediate_size, c.hidden_size), c.mlp_bias),
        "mlp.down_proj": ((c.hidden_size, c.intermediate_size), c.mlp_bias),
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (c.hidden_size,)
        shapes[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
        for name, (shape, has_bias) in linears.items():
            shapes[p + name + ".weight"] = shape
            if has_bias:
                shapes[p + name + ".bias"] = (shape[0],)
    return shapes


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def load_weight_map(source: TensorSource | GGUFTensorSource, config: LlamaConfig) -> WeightMap:
    """Check the checkpoint's tensors against the config and assemble the WeightMap (no data is read)."""
    shapes = expected_shapes(config)
    present = set(source.names())
    if config.tie_word_embeddings:
        # HF ties regardless of a stored lm_head.weight; accept one but never use it.
        present.discard("lm_head.weight")
    missing = sorted(set(shapes) - present)
    unexpected = sorted(n for n in present - set(shapes) if not n.endswith(IGNORED_SUFFIXES))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    for name in sorted(set(shapes) & present):
        info = source.info(name)
        if info.shape != shapes[name]:
            problems.append(f"'{name}' has shape {list(info.shape)}, the config needs {list(shapes[name])} "
                            f"(in {info.path.name})")
        elif info.dtype not in FLOAT_DTYPES:
            problems.append(f"'{name}' has dtype {info.dtype}; float weights must be one of {FLOAT_DTYPES} "
                            f"(in {info.path.name})")
    if problems:
        if config.quantization_config is not None:
            problems.append(f"quantization method '{config.quantization_config.method.value}' is not supported "
                            "by this loader yet")
        raise WeightError("checkpoint does not match config.json: " + "; ".join(problems), source.folder)

    def get(name: str) -> np.ndarray:
        return source.get(name)

    def linear(prefix: str, has_bias: bool) -> Linear:
        return Linear(get(prefix + ".weight"), get(prefix + ".bias") if has_bias else None)

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        ab, mb = config.attention_bias, config.mlp_bias
        layers.append(LayerWeights(
            self_attention=AttentionWeights(
                q_proj=linear(p + "self_attn.q_proj", ab), k_proj=linear(p + "self_attn.k_proj", ab),
                v_proj=linear(p + "self_attn.v_proj", ab), o_proj=linear(p + "self_attn.o_proj", ab)),
            mlp=MLPWeights(
                gate_proj=linear(p + "mlp.gate_proj", mb), up_proj=linear(p + "mlp.up_proj", mb),
                down_proj=linear(p + "mlp.down_proj", mb)),
            input_layernorm=get(p + "input_layernorm.weight"),
            post_attention_layernorm=get(p + "post_attention_layernorm.weight"),
        ))
    return WeightMap(
        embeddings=get("model.embed_tokens.weight"),
        layers=layers,
        final_norm=get("model.norm.weight"),
        lm_head=None if config.tie_word_embeddings else get("lm_head.weight"),
    )


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
