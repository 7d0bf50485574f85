"""Checkpoint tensors under Hugging Face names -> the spec's WeightMap, with strict key and shape checks.

Weights stay as they are stored (read-only memory-mapped views); converting them to the compute dtype is the
backend's job (`WeightMap.map`). A checkpoint whose tensors do not match the config fails here with every
missing, unexpected or misshapen tensor named, before any forward pass can run on a wrong model.

Quantized checkpoints (compressed-tensors, GPTQ, AWQ: refllama/quant/) keep their Linears quantized: a
`Linear.weight` is then an `Int8Weight` or `PackedIntWeight` over the stored integer tensors, and the backend's
`linear` dispatches on its type. `dequantize=True` turns weight-only ones into float32 at load instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from refllama.config import LlamaConfig
from refllama.errors import WeightError, brief
from refllama.formats.safetensors import TensorSource
from refllama.model.weights import AttentionWeights, LayerWeights, Linear, MLPWeights, StageSpan, WeightMap
from refllama.quant.config import QuantizationMethod, read_quantize_config
from refllama.quant.loader import LINEAR_SUFFIXES, LinearPlan, TensorSpec, build_weight, plan_linears, tensor_specs
from refllama.quant.types import ActivationQuant, Int8Weight, is_quantized
from refllama.quant.types import dequantize as dequantize_weight

if TYPE_CHECKING:
    from refllama.formats.gguf_llama import GGUFTensorSource

Array = Any  # a backend array: numpy.ndarray, cupy.ndarray, mlx.core.array

# Tensors some exporters write that carry nothing the model reads (recomputed from the config).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


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
    plans = _quantization_plans(source, config)
    shapes = expected_shapes(config)
    specs = {name: TensorSpec(shape, FLOAT_DTYPES) for name, shape in shapes.items()}
    for module, plan in plans.items():
        if plan is not None:
            out_features, in_features = specs.pop(module + ".weight").shape
            specs.update(tensor_specs(plan, module, out_features, in_features))
    stored = set(source.names())
    present = set(stored)
    if config.tie_word_embeddings:
        # HF ties regardless of a stored lm_head.weight; accept one but never use it.
        present.discard("lm_head.weight")
    tied = config.tie_word_embeddings
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

    span = span or StageSpan(0, config.num_hidden_layers, embeds=True, head=True)
    layers: list[LayerWeights | None] = [None] * config.num_hidden_layers
    for i in span.layers:
        p = f"model.layers.{i}."
        ab, mb = config.attention_bias, config.mlp_bias
        layers[i] = LayerWeights(
            self_attention=AttentionWeights(
                q_proj=linear(p + "self_attn.q_proj", ab), k_proj=linear(p + "self_attn.k_proj", ab),
                v_proj=linear(p + "self_attn.v_proj", ab), o_proj=linear(p + "self_attn.o_proj", ab)),
            mlp=MLPWeights(
                gate_proj=linear(p + "mlp.gate_proj", mb), up_proj=linear(p + "mlp.up_proj", mb),
                down_proj=linear(p + "mlp.down_proj", mb)),
            input_layernorm=get(p + "input_layernorm.weight"),
            post_attention_layernorm=get(p + "post_attention_layernorm.weight"),
        )
    return WeightMap(
        embeddings=get("model.embed_tokens.weight") if span.holds("model.embed_tokens.weight", tied) else None,
        layers=layers,
        final_norm=get("model.norm.weight") if span.head else None,
        lm_head=None if tied or not span.head else linear("lm_head", False).weight,
    )


def linear_modules(config: LlamaConfig) -> list[str]:
    """Every Linear of the model by HF module name (lm_head only when it has its own weight)."""
    names = [f"model.layers.{i}.{suffix}" for i in range(config.num_hidden_layers) for suffix in LINEAR_SUFFIXES]
    return names if config.tie_word_embeddings else [*names, "lm_head"]


def _quantization_plans(source: TensorSource | GGUFTensorSource, config: LlamaConfig) -> dict[str, LinearPlan | None]:
    """What each Linear is stored as; empty for float checkpoints and GGUF (whose reader dequantizes)."""
    q = config.quantization_config
    if q is None and isinstance(source, TensorSource):
        q = read_quantize_config(source.model_folder)
    if q is None or q.method is QuantizationMethod.GGUF:
        return {}
    return plan_linears(q, linear_modules(config))


def quantized_linears(weights: WeightMap) -> list[Any]:
    """The quantized weight objects of a WeightMap, in layer order (lm_head last)."""
    found = [lin.weight for layer in weights.layers
             for lin in (*vars(layer.self_attention).values(), *vars(layer.mlp).values()) if is_quantized(lin.weight)]
    return [*found, weights.lm_head] if is_quantized(weights.lm_head) else found


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(n if len(n) <= 100 else brief(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
