"""Checkpoint tensors under Hugging Face names -> the spec's WeightMap, with strict key and shape checks.

Weights stay as they are stored (read-only memory-mapped views); converting them to the compute dtype is the
backend's job (`WeightMap.map`). A checkpoint whose tensors do not match the config fails here with every
missing, unexpected or misshapen tensor named, before any forward pass can run on a wrong model.

Quantized checkpoints (compressed-tensors, GPTQ, AWQ: refllama/quant/) keep their Linears quantized: a
`Linear.weight` is then an `Int8Weight` or `PackedIntWeight` over the stored integer tensors, and the backend's
`linear` dispatches on its type. `dequantize=True` turns weight-only ones into float32 at load instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from refllama.config import LlamaConfig
from refllama.errors import WeightError, brief
from refllama.formats.safetensors import TensorSource
from refllama.model.weights import AttentionWeights, LayerWeights, Linear, MLPWeights, MoEWeights, StageSpan, WeightMap
from refllama.quant.config import QuantizationMethod, read_quantize_config
from refllama.quant.loader import LinearPlan, TensorSpec, build_weight, plan_linears, tensor_specs
from refllama.quant.types import ActivationQuant, Int8Weight, is_quantized
from refllama.quant.types import dequantize as dequantize_weight

if TYPE_CHECKING:
    from refllama.formats.gguf_llama import GGUFTensorSource

Array = Any  # a backend array: numpy.ndarray, cupy.ndarray, mlx.core.array

# Tensors some exporters write that carry nothing the model reads (recomputed from the config).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Llama 4 multimodal checkpoints hold the text model under this prefix, beside towers the text model never reads.
TEXT_MODEL_PREFIX = "language_model."
NON_TEXT_PREFIXES = ("vision_model.", "multi_modal_projector.")


@dataclass(frozen=True)
class MLPNames:
    """Where one architecture keeps a layer's MLP (names under model.layers.N.).

    An MoE layer is stored either per expert (each expert's three Linears, {e} its index: what the original
    checkpoints and quantized ones hold) or stacked (one [E, ...] tensor per projection: transformers 5's
    layout; Llama 4's gate_up_proj is [E, hidden, 2I] used as x @ W, Mixtral's [E, 2I, hidden] as W @ x)."""

    dense: tuple[str, str, str]  # gate, up, down of a dense layer
    router: str = ""
    experts: tuple[str, str, str] = ("", "", "")  # gate, up, down of expert {e}
    stacked_router: str = ""
    stacked: tuple[str, str] = ("", "")  # gate_up, down
    stacked_x_at_w: bool = False
    shared: tuple[str, str, str] | None = None


MLP_NAMES = {
    "llama": MLPNames(("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    "mixtral": MLPNames(
        ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), "block_sparse_moe.gate",
        ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3", "block_sparse_moe.experts.{e}.w2"),
        "mlp.gate", ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")),
    "llama4_text": MLPNames(
        ("feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj"), "feed_forward.router",
        ("feed_forward.experts.{e}.gate_proj", "feed_forward.experts.{e}.up_proj",
         "feed_forward.experts.{e}.down_proj"),
        "feed_forward.router", ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"), True,
        ("feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.up_proj",
         "feed_forward.shared_expert.down_proj")),
}


def mlp_names(config: LlamaConfig) -> MLPNames:
    return MLP_NAMES.get(config.model_type, MLP_NAMES["llama"])


def stored_stacked(config: LlamaConfig, names: set[str]) -> bool:
    """Whether the checkpoint stores its experts stacked (else per expert)."""
    if config.moe is None:
        return False
    first = f"model.layers.{config.moe.layers[0]}.{mlp_names(config).stacked[0]}"
    return first in names


def layer_linears(config: LlamaConfig, i: int, stacked: bool = False) -> dict[str, tuple[tuple[int, int], bool]]:
    """Layer i's Linear modules (names under model.layers.i.) -> ([out, in] shape, has a bias)."""
    c, n = config, mlp_names(config)
    q_out, kv_out, hidden = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size
    ab = c.attention_bias
    linears = {"self_attn.q_proj": ((q_out, hidden), ab), "self_attn.k_proj": ((kv_out, hidden), ab),
               "self_attn.v_proj": ((kv_out, hidden), ab), "self_attn.o_proj": ((hidden, q_out), ab)}

    def mlp(names: tuple[str, str, str], inter: int, bias: bool = False) -> None:
        gate, up, down = names
        linears.update({gate: ((inter, hidden), bias), up: ((inter, hidden), bias), down: ((hidden, inter), bias)})

    if not c.is_moe_layer(i):
        mlp(n.dense, c.intermediate_size, c.mlp_bias)
        return linears
    moe = c.moe
    linears[n.stacked_router if stacked else n.router] = ((moe.num_experts, hidden), False)
    if not stacked:
        for e in range(moe.num_experts):
            mlp(tuple(name.format(e=e) for name in n.experts), moe.intermediate_size)
    if moe.shared_expert:
        mlp(n.shared, moe.intermediate_size)
    return linears


def stacked_shapes(config: LlamaConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Layer i's stacked expert tensors (names under model.layers.i.) -> shape."""
    c, n = config, mlp_names(config)
    E, inter, hidden = c.moe.num_experts, c.moe.intermediate_size, c.hidden_size
    if n.stacked_x_at_w:
        return {n.stacked[0]: (E, hidden, 2 * inter), n.stacked[1]: (E, inter, hidden)}
    return {n.stacked[0]: (E, 2 * inter, hidden), n.stacked[1]: (E, hidden, inter)}


def expected_shapes(config: LlamaConfig, stacked: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint with this config must hold, by HF name, with its shape (`stacked`: MoE experts
    as [E, ...] tensors rather than per-expert Linears)."""
    c = config
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (c.hidden_size,)
        shapes[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
        for name, (shape, has_bias) in layer_linears(c, i, stacked).items():
            shapes[p + name + ".weight"] = shape
            if has_bias:
                shapes[p + name + ".bias"] = (shape[0],)
        if stacked and c.is_moe_layer(i):
            shapes.update({p + name: shape for name, shape in stacked_shapes(c, i).items()})
    return shapes


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def load_weight_map(source: TensorSource | GGUFTensorSource, config: LlamaConfig, *, dequantize: bool = False,
                    activation_semantics: str = "hf", span: StageSpan | None = None) -> WeightMap:
    """Check the checkpoint's tensors against the config and assemble the WeightMap (no data is read).

    Quantized Linears (config.json's `quantization_config`, or GPTQ's quantize_config.json) stay quantized;
    `dequantize=True` makes weight-only ones float32 at load (W8A8 Linears keep their integer GEMM: dequantizing
    them would drop the activation quantization and change the function). `activation_semantics` ("hf" or
    "vllm") is how W8A8 Linears quantize their inputs (refllama/quant/int8.py). With a `span` (a pipeline stage),
    only its tensors must be present and only they are read; the rest of the map is None.
    """
    ActivationQuant(activation_semantics)  # validates the name before anything is read
    source = text_model(source)
    stored = set(source.names())
    stacked = stored_stacked(config, stored)
    plans = _quantization_plans(source, config, stacked)
    shapes = expected_shapes(config, stacked)
    tied = config.tie_word_embeddings
    head_plan = plans.pop("lm_head", None) if tied else None
    if head_plan is not None:  # a quantized copy of the tied table, where the checkpoint stores one
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
        head_specs = tensor_specs(head_plan, "lm_head", *shapes["lm_head.weight"])
        if all(n in stored for n, spec in head_specs.items() if not spec.optional):
            plans["lm_head"], tied = head_plan, False
        else:
            del shapes["lm_head.weight"]
    specs = {name: TensorSpec(shape, FLOAT_DTYPES) for name, shape in shapes.items()}
    for module, plan in plans.items():
        if plan is not None:
            out_features, in_features = specs.pop(module + ".weight").shape
            specs.update(tensor_specs(plan, module, out_features, in_features))
    present = set(stored)
    if tied:
        # HF ties regardless of a stored lm_head.weight; accept one (or a partial quantized one) but never use it.
        present -= {n for n in present if n.startswith("lm_head.")}
    missing = sorted(n for n, spec in specs.items() if n not in present and not spec.optional
                     and (span is None or span.holds(n, tied)))
    unexpected = sorted(n for n in present - set(specs) if not n.endswith(IGNORED_SUFFIXES))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    for name in sorted(set(specs) & present):
        info, spec = source.info(name), specs[name]
        if info.shape != spec.shape:
            problems.append(f"'{name}' has shape {list(info.shape)}, the config needs {list(spec.shape)} "
                            f"(in {info.path.name})")
        elif info.dtype not in spec.dtypes:
            kind = "float weights" if spec.dtypes == FLOAT_DTYPES else "it"
            problems.append(f"'{name}' has dtype {info.dtype}; {kind} must be one of {spec.dtypes} "
                            f"(in {info.path.name})")
    if problems:
        q = config.quantization_config
        if q is not None and any(plans.values()):
            schemes = sorted({p.scheme for p in plans.values() if p is not None})
            problems.append(f"the config's quantization ({q.method.value}: {', '.join(schemes)}) fixes these names "
                            "and shapes")
        raise WeightError("checkpoint does not match config.json: " + "; ".join(problems), source.folder)

    def get(name: str) -> np.ndarray:
        return source.get(name)

    def linear(prefix: str, has_bias: bool) -> Linear:
        bias = get(prefix + ".bias") if has_bias else None
        plan = plans.get(prefix)
        if plan is None:
            return Linear(get(prefix + ".weight"), bias)
        out_features, in_features = shapes[prefix + ".weight"]
        weight = build_weight(plan, prefix, get, stored.__contains__, out_features, in_features, activation_semantics)
        if dequantize and not (isinstance(weight, Int8Weight) and weight.activation is not None):
            weight = dequantize_weight(weight, np.float32)  # weight-only: the same function, computed ahead
        return Linear(weight, bias)

    names = mlp_names(config)

    def mlp(p: str, modules: tuple[str, str, str], bias: bool = False) -> MLPWeights:
        gate, up, down = (linear(p + m, bias) for m in modules)
        return MLPWeights(gate_proj=gate, up_proj=up, down_proj=down)

    def moe(p: str) -> MoEWeights:
        E, inter = config.moe.num_experts, config.moe.intermediate_size
        shared = mlp(p, names.shared) if config.moe.shared_expert else None
        if not stacked:
            experts = [mlp(p, tuple(m.format(e=e) for m in names.experts)) for e in range(E)]
            return MoEWeights(linear(p + names.router, False), experts, shared)
        gate_up, down = get(p + names.stacked[0]), get(p + names.stacked[1])
        if names.stacked_x_at_w:  # [E, hidden, 2I] and [E, I, hidden], used as x @ W: transposed views
            gate_up, down = gate_up.transpose(0, 2, 1), down.transpose(0, 2, 1)
        experts = [MLPWeights(Linear(gate_up[e, :inter]), Linear(gate_up[e, inter:]), Linear(down[e]))
                   for e in range(E)]  # views of the stored tensors: [I, hidden], [I, hidden], [hidden, I]
        return MoEWeights(linear(p + names.stacked_router, False), experts, shared)

    span = span or StageSpan(0, config.num_hidden_layers, embeds=True, head=True)
    layers: list[LayerWeights | None] = [None] * config.num_hidden_layers
    for i in span.layers:
        p = f"model.layers.{i}."
        ab = config.attention_bias
        layers[i] = LayerWeights(
            self_attention=AttentionWeights(
                q_proj=linear(p + "self_attn.q_proj", ab), k_proj=linear(p + "self_attn.k_proj", ab),
                v_proj=linear(p + "self_attn.v_proj", ab), o_proj=linear(p + "self_attn.o_proj", ab)),
            mlp=moe(p) if config.is_moe_layer(i) else mlp(p, names.dense, config.mlp_bias),
            input_layernorm=get(p + "input_layernorm.weight"),
            post_attention_layernorm=get(p + "post_attention_layernorm.weight"),
        )
    return WeightMap(
        embeddings=get("model.embed_tokens.weight") if span.holds("model.embed_tokens.weight", tied) else None,
        layers=layers,
        final_norm=get("model.norm.weight") if span.head else None,
        lm_head=None if tied or not span.head else linear("lm_head", False).weight,
    )


def linear_modules(config: LlamaConfig, stacked: bool = False) -> list[str]:
    """Every Linear of the model by HF module name, lm_head last (with tied embeddings too: a quantized checkpoint
    may store a quantized copy of the tied table as lm_head)."""
    names = [f"model.layers.{i}.{module}" for i in range(config.num_hidden_layers)
             for module in layer_linears(config, i, stacked)]
    return [*names, "lm_head"]


def _quantization_plans(source: TensorSource | GGUFTensorSource, config: LlamaConfig,
                        stacked: bool = False) -> dict[str, LinearPlan | None]:
    """What each Linear is stored as; empty for float checkpoints and GGUF (whose reader dequantizes)."""
    q = config.quantization_config
    if q is None and isinstance(source, TensorSource):
        q = read_quantize_config(source.model_folder)
    if q is None or q.method is QuantizationMethod.GGUF:
        return {}
    return plan_linears(q, linear_modules(config, stacked))


def layer_linear_weights(layer: LayerWeights) -> list[Linear]:
    """A layer's Linears: attention, then the MLP's (an MoE layer's router, each expert's, the shared expert's)."""
    mlp = layer.mlp
    mlps = [mlp] if isinstance(mlp, MLPWeights) else [*mlp.experts, *([mlp.shared_expert] if mlp.shared_expert
                                                                      else [])]
    found = list(vars(layer.self_attention).values())
    if isinstance(mlp, MoEWeights):
        found.append(mlp.router)
    return found + [lin for m in mlps for lin in vars(m).values()]


def quantized_linears(weights: WeightMap) -> list[Any]:
    """The quantized weight objects of a WeightMap, in layer order (lm_head last)."""
    found = [lin.weight for layer in weights.layers for lin in layer_linear_weights(layer)
             if is_quantized(lin.weight)]
    return [*found, weights.lm_head] if is_quantized(weights.lm_head) else found


class _TextModel:
    """A Llama 4 multimodal checkpoint seen as its text model: `language_model.` stripped, the vision tower and
    projector left out (the text model never reads them)."""

    def __init__(self, source: TensorSource):
        self.source, self.folder = source, source.folder
        self._stored = {n[len(TEXT_MODEL_PREFIX):]: n for n in source.names() if n.startswith(TEXT_MODEL_PREFIX)}
        self._stored.update({n: n for n in source.names()
                             if not n.startswith((TEXT_MODEL_PREFIX, *NON_TEXT_PREFIXES))})

    def names(self) -> list[str]:
        return list(self._stored)

    def info(self, name: str) -> Any:
        return self.source.info(self._stored[name])

    def get(self, name: str) -> np.ndarray:
        return self.source.get(self._stored[name])


def text_model(source: Any) -> Any:
    """`source`, or its text model when it is a Llama 4 multimodal checkpoint."""
    if isinstance(source, TensorSource) and any(n.startswith(TEXT_MODEL_PREFIX) for n in source.names()):
        return _TextModel(source)
    return source


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(n if len(n) <= 100 else brief(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
