"""Quantizing float weights with compressed-tensors' own formulas, per-layer data types, and precision switching.

`quantize_weight` reproduces what llm-compressor's data-free path (memoryless min-max observer, then
compressed-tensors' `calculate_qparams` and `quantize`) does to one weight, operation by operation in the weight's
own dtype: torch computes a bf16 op in float32 and rounds the result to bf16, and so does `_round` here. So the
codes, scales and zero points are bit for bit those of a checkpoint the library writes (tests compare with the
tiny fixtures made by llm-compressor 0.14, and the SmolLM2 W8A8 tool with compressed-tensors itself).

Symmetric: scale = absmax / ((qmax - qmin) / 2) (absmax/127.5 for int8, /7.5 for int4), min/max clamped to
include 0, a zero scale replaced by the dtype's eps; codes = rint(clip(w / scale, qmin, qmax)), with w / scale
rounded to the weight dtype first (for bf16 that quotient has 8 significant bits, so ties are common).
Asymmetric: scale = (max - min) / (qmax - qmin), zp = rint(clip(qmin - min / scale)), codes =
rint(clip(w / scale + zp)).

`apply_layer_dtypes` applies a LayerDataTypeConfig (refllama.dtypes) to a float WeightMap at load;
`GenericLlamaEngine.set_precision` re-derives its weights with `apply_layer_dtypes` from the source it kept,
without rereading any file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from refllama.config import LlamaConfig
from refllama.dtypes import AttentionComponent, DataType, LayerDataTypeConfig, MLPComponent
from refllama.errors import ConfigError
from refllama.quant.config import QuantizationSpec
from refllama.quant.packing import pack_rows
from refllama.quant.types import ActivationQuant, Int8Weight, PackedIntWeight, dequantize, is_quantized

# --- one weight ---------------------------------------------------------------------------------------------------


def _round(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A result computed in float32 (float64 for float64 weights) rounded to the weight dtype, as torch does."""
    return np.asarray(a).astype(dtype).astype(_opmath(dtype))


def _opmath(dtype: np.dtype) -> type:
    return np.float64 if dtype == np.float64 else np.float32


def _eps(dtype: np.dtype) -> float:
    import ml_dtypes  # here, not at the top: its import is slow (refllama/dtypes.py)

    return float(ml_dtypes.finfo(dtype).eps)


def quantize_weight(w: np.ndarray, spec: QuantizationSpec, activation: ActivationQuant | None = None,
                    name: str = "weight") -> Int8Weight | PackedIntWeight:
    """A float weight [out, in] (any float dtype) quantized as compressed-tensors would; 8-bit codes become an
    Int8Weight, narrower ones a PackedIntWeight. Scales keep the weight's dtype, as the library stores them."""
    import ml_dtypes  # here, not at the top: its import is slow (refllama/dtypes.py)

    w = np.asarray(w)
    dtype = w.dtype
    if w.ndim != 2 or not (np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16):
        raise ConfigError(name, f"only float [out, in] weights can be quantized, got {dtype} {list(w.shape)}")
    if spec.type != "int" or not 1 <= spec.num_bits <= 8:
        raise ConfigError(name, f"cannot quantize to {spec.type} {spec.num_bits}-bit")
    out_features, in_features = w.shape
    ops = _opmath(dtype)
    qmin, qmax = -(1 << (spec.num_bits - 1)), (1 << (spec.num_bits - 1)) - 1
    if spec.strategy == "group":
        if not spec.group_size or in_features % spec.group_size:
            raise ConfigError(name, f"group_size {spec.group_size} does not divide in_features {in_features} "
                              "(compressed-tensors refuses it too; pick a divisor or per-channel)")
        groups = w.astype(ops).reshape(out_features, -1, spec.group_size)  # (out, G, gs)
        lo, hi = groups.min(-1), groups.max(-1)  # (out, G)
    elif spec.strategy == "channel":
        groups = w.astype(ops)[:, None, :]  # (out, 1, in)
        lo, hi = groups.min(-1), groups.max(-1)
    elif spec.strategy == "tensor":
        groups = w.astype(ops).reshape(1, 1, -1)
        lo, hi = groups.min(-1), groups.max(-1)  # (1, 1)
    else:
        raise ConfigError(name, f"weight strategy {spec.strategy!r} cannot be quantized (tensor, channel, group)")
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)  # 0 must be representable
    if spec.symmetric:
        absmax = np.maximum(np.abs(lo), np.abs(hi))
        scale = _round(absmax / ops((qmax - qmin) / 2), dtype)
        zp = None
    else:
        scale = _round(_round(hi - lo, dtype) / ops(qmax - qmin), dtype)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp_float = _round(ops(qmin) - _round(lo / scale, dtype), dtype)
        # An all-zero group (scale 0) gives 0/0 in the library; its codes are 0 whatever the zero point, so use 0.
        zp_float = np.where(np.isnan(zp_float), 0, zp_float)
        zp = np.rint(np.clip(np.clip(zp_float, qmin, qmax), -128, 127)).astype(np.int8)
    scale = np.where(scale == 0, ops(_eps(dtype)), scale)
    scaled = _round(groups / scale[..., None], dtype)  # (out, G, gs)
    if zp is not None:
        scaled = _round(scaled + zp[..., None].astype(ops), dtype)
    codes = np.rint(np.clip(scaled, qmin, qmax)).astype(np.int8).reshape(out_features, in_features)
    stored_scale = scale.astype(dtype)  # (out, G) or (1, 1)
    group_size = spec.group_size if spec.strategy == "group" else None
    if spec.num_bits == 8:
        return Int8Weight(codes, stored_scale, zp, group_size, None, activation)
    if activation is not None:
        raise ConfigError(name, f"int8 activations need 8-bit weights, not {spec.num_bits}-bit")
    offset = 1 << (spec.num_bits - 1)
    packed = pack_rows((codes.astype(np.int16) + offset).astype(np.uint8), spec.num_bits)
    zero = None if zp is None else zp.astype(np.int32) + offset
    return PackedIntWeight(packed, stored_scale, spec.num_bits, in_features, zero, group_size)


# --- per-layer data types ----------------------------------------------------------------------------------------

def weight_presets(group_size: int | None = 128) -> dict[DataType, tuple[QuantizationSpec, bool]]:
    """DataType -> (weight spec, int8 activations?). W8A8 is compressed-tensors' preset (int8 per channel,
    dynamic per-token activations); W4A16/I4/U4 are group-wise (`group_size`, the library's 128 by default,
    None for per-channel); W8A16/I8/U8 per channel (the library's preset before it moved to group 128, and
    valid for any shape). U4/U8 are the asymmetric versions."""
    def grouped(bits: int, symmetric: bool) -> QuantizationSpec:
        if group_size is None:
            return QuantizationSpec(bits, symmetric, strategy="channel")
        return QuantizationSpec(bits, symmetric, group_size=group_size, strategy="group")

    channel8 = QuantizationSpec(8, True, strategy="channel")
    return {
        DataType.W8A8: (channel8, True),
        DataType.W8A16: (channel8, False),
        DataType.I8: (channel8, False),
        DataType.U8: (QuantizationSpec(8, False, strategy="channel"), False),
        DataType.W4A16: (grouped(4, True), False),
        DataType.I4: (grouped(4, True), False),
        DataType.U4: (grouped(4, False), False),
    }


_FLOATS = (DataType.F64, DataType.F32, DataType.F16, DataType.BF16)
_ATTENTION = {AttentionComponent.QueryProjection: "q_proj", AttentionComponent.KeyProjection: "k_proj",
              AttentionComponent.ValueProjection: "v_proj", AttentionComponent.OutputProjection: "o_proj"}
_MLP = {MLPComponent.GateProjection: "gate_proj", MLPComponent.UpProjection: "up_proj",
        MLPComponent.DownProjection: "down_proj"}


def _as_float(a: Any, dtype: DataType, where: str) -> Any:
    """`a` holding values of `dtype`: rounded when that type is narrower, else kept as stored (no copy)."""
    if dtype not in _FLOATS:
        raise ConfigError(where, f"must be a float type ({', '.join(d.value for d in _FLOATS)}), got {dtype.value}")
    if is_quantized(a):
        raise ConfigError(where, "the checkpoint's tensor is quantized; per-layer types apply to float tensors")
    target = dtype.numpy_dtype
    src = np.asarray(a).dtype
    if src == target or target == np.float64 or (target == np.float32 and src.itemsize <= 4):
        return a  # every value is already one of the target type's: keep the stored view
    return np.asarray(a).astype(target)


def apply_layer_dtypes(weights: Any, layer_dtypes: LayerDataTypeConfig, *, group_size: int | None = 128,
                       semantics: str = "hf") -> Any:
    """A new WeightMap with `layer_dtypes` applied to a float WeightMap (the source is not modified).

    embedding (the table and an untied lm_head) and layer_norm (every RMSNorm weight) take float types;
    each q/k/v/o and gate/up/down projection named in the dicts takes a float type (rounded) or a quantized one
    (weight_presets); projections not named stay as stored. activations = I8 gives every projection with
    symmetric per-channel int8 weights (W8A16, I8) int8 activations as well, i.e. makes it W8A8; float
    activation types leave the compute to the engine's dtype.
    """
    from refllama.formats.checkpoint import Linear  # formats/checkpoint.py imports this package

    presets = weight_presets(group_size)
    act8 = layer_dtypes.activations is DataType.I8

    def linear(lin: Linear, dtype: DataType | None, where: str) -> Linear:
        if dtype is None:
            return lin
        if dtype in presets:
            if is_quantized(lin.weight):
                raise ConfigError(where, "the checkpoint's weight is quantized already; per-layer types apply "
                                  "to float checkpoints")
            spec, with_act = presets[dtype]
            with_act = with_act or (act8 and spec.num_bits == 8 and spec.symmetric and spec.strategy != "group")
            activation = ActivationQuant(semantics) if with_act else None
            return replace(lin, weight=quantize_weight(lin.weight, spec, activation, where))
        return replace(lin, weight=_as_float(lin.weight, dtype, where))

    rope = layer_dtypes.attention_weights.get(AttentionComponent.RotaryEmbedding)
    if rope is not None and rope not in (DataType.F32, DataType.F64):
        raise ConfigError("layer_dtypes.attention_weights[rotary_emb]", "RoPE tables are computed in float64 on "
                          f"the host and cast to the compute dtype; {rope.value} is not an option")
    layers = []
    for i, layer in enumerate(weights.layers):
        p = f"model.layers.{i}."
        attn = layer.self_attention
        attn = replace(attn, **{name: linear(getattr(attn, name), layer_dtypes.attention_weights.get(c),
                                             f"layer_dtypes.attention_weights[{name}] ({p}self_attn.{name})")
                                for c, name in _ATTENTION.items()})
        def mlp_types(mlp: Any, where: str) -> Any:
            return replace(mlp, **{name: linear(getattr(mlp, name), layer_dtypes.mlp_weights.get(c),
                                                f"layer_dtypes.mlp_weights[{name}] ({where}.{name})")
                                   for c, name in _MLP.items()})

        mlp = layer.mlp
        if hasattr(mlp, "experts"):  # MoE: each expert and the shared expert take the MLP's types; the router
            shared = mlp.shared_expert  # stays as stored, as quantized MoE checkpoints keep it
            mlp = replace(mlp, experts=[mlp_types(e, f"{p}experts.{j}") for j, e in enumerate(mlp.experts)],
                          shared_expert=None if shared is None else mlp_types(shared, f"{p}shared_expert"))
        else:
            mlp = mlp_types(mlp, p + "mlp")
        norms = {name: _as_float(getattr(layer, name), layer_dtypes.layer_norm, f"layer_dtypes.layer_norm ({p}{name})")
                 for name in ("input_layernorm", "post_attention_layernorm")}
        layers.append(replace(layer, self_attention=attn, mlp=mlp, **norms))
    emb = layer_dtypes.embedding
    lm_head = weights.lm_head
    if lm_head is not None and not is_quantized(lm_head):
        lm_head = _as_float(lm_head, emb, "layer_dtypes.embedding (lm_head)")
    return replace(weights, layers=layers,
                   embeddings=_as_float(weights.embeddings, emb, "layer_dtypes.embedding"),
                   final_norm=_as_float(weights.final_norm, layer_dtypes.layer_norm,
                                        "layer_dtypes.layer_norm (model.norm)"),
                   lm_head=lm_head)


# --- the output projection -----------------------------------------------------------------------------------------

LM_HEAD_DTYPES = ("int8",)


def quantize_lm_head(weights: Any, lm_head_dtype: str, semantics: str = "hf") -> Any:
    """The WeightMap with its head quantized at load: "int8" is compressed-tensors' W8A8 preset (symmetric int8
    per output channel, dynamic per-token int8 inputs: how a W8A8 checkpoint's other Linears run), so a checkpoint
    that keeps its head float runs it like a llama.cpp q8_0 file does. A tied head becomes a separate quantized
    copy of the embedding table (the lookup keeps the float table). A head already int8 W8A8 is kept; one stored
    in another quantized form is refused rather than quantized twice."""
    from refllama.errors import InputError

    if lm_head_dtype not in LM_HEAD_DTYPES:
        raise InputError(f"lm_head_dtype must be one of {LM_HEAD_DTYPES} or None, got {lm_head_dtype!r}")
    head = weights.embeddings if weights.lm_head is None else weights.lm_head
    if isinstance(head, Int8Weight) and head.activation is not None and head.group_size is None:
        return weights
    if not isinstance(head, np.ndarray):
        raise InputError(f"lm_head_dtype={lm_head_dtype!r}: the head is already stored as {describe_weight(head)}; "
                         "only a float head is quantized at load")
    spec, activations = weight_presets()[DataType.W8A8]
    quantized = quantize_weight(head, spec, ActivationQuant(semantics) if activations else None, "lm_head")
    return replace(weights, lm_head=quantized)


def describe_weight(w: Any) -> str:
    """A weight's storage in a few words ("int8 W8A8 per-channel", "float32", "Q4_1 blocks")."""
    if isinstance(w, Int8Weight):
        what = "int8 " + ("W8A8" if w.activation is not None else "W8A16")
        what += f" group {w.group_size}" if w.group_size else (" per-tensor" if w.scale.size == 1
                                                                else " per-channel")
        return what + ("" if w.zero_point is None else " asymmetric")
    if isinstance(w, PackedIntWeight):
        return f"int{w.bits} packed " + (f"group {w.group_size}" if w.group_size else "per-channel")
    ggml_type = getattr(w, "ggml_type", None)
    if ggml_type is not None:
        return f"{ggml_type.name} blocks"
    return str(getattr(w, "dtype", type(w).__name__))


def map_linear_weights(weights: Any, fn: Callable[[Any], Any]) -> Any:
    """A new WeightMap with `fn` applied to every Linear's weight (and to lm_head), everything else shared."""
    def attn_or_mlp(block: Any) -> Any:
        if hasattr(block, "experts"):  # MoE: the router, every expert, the shared expert
            shared = block.shared_expert
            return replace(block, router=replace(block.router, weight=fn(block.router.weight)),
                           experts=[attn_or_mlp(e) for e in block.experts],
                           shared_expert=None if shared is None else attn_or_mlp(shared))
        return replace(block, **{k: replace(v, weight=fn(v.weight)) for k, v in vars(block).items()})

    layers = [replace(layer, self_attention=attn_or_mlp(layer.self_attention), mlp=attn_or_mlp(layer.mlp))
              for layer in weights.layers]
    lm_head = None if weights.lm_head is None else fn(weights.lm_head)
    return replace(weights, layers=layers, lm_head=lm_head)


def dequantize_weights(weights: Any) -> Any:
    """Weight-only quantized Linears -> float32 (the same function, computed ahead); W8A8 ones are kept."""
    def fn(w: Any) -> Any:
        if isinstance(w, Int8Weight) and w.activation is not None:
            return w
        return dequantize(w, np.float32) if is_quantized(w) else w
    return map_linear_weights(weights, fn)


def set_activation_semantics(weights: Any, semantics: str) -> Any:
    """Every W8A8 Linear switched to "hf" or "vllm" activation quantization (arrays shared, nothing copied)."""
    activation = ActivationQuant(semantics)

    def fn(w: Any) -> Any:
        return replace(w, activation=activation) if isinstance(w, Int8Weight) and w.activation else w
    return map_linear_weights(weights, fn)


# --- writing a compressed-tensors checkpoint ---------------------------------------------------------------------

def compressed_tensors_block(spec: QuantizationSpec, activations: bool, fmt: str,
                             ignore: list[str] | None = None) -> dict[str, Any]:
    """The `quantization_config` compressed-tensors 0.20 writes for one group targeting every Linear."""
    def args(num_bits: int, symmetric: bool, strategy: str, group_size: int | None, dynamic: bool) -> dict:
        return {"dynamic": dynamic, "group_size": group_size, "num_bits": num_bits, "strategy": strategy,
                "symmetric": symmetric, "type": "int"}

    group = {"format": fmt, "input_activations": args(8, True, "token", None, True) if activations else None,
             "output_activations": None, "targets": ["Linear"],
             "weights": args(spec.num_bits, spec.symmetric, spec.strategy, spec.group_size, False)}
    if not spec.symmetric:
        group["weights"]["zp_dtype"] = "torch.int8"
    return {"config_groups": {"group_0": group}, "format": fmt, "global_compression_ratio": None,
            "ignore": list(ignore if ignore is not None else ["lm_head"]), "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}}


def compressed_tensors_tensors(weights: Any, config: Any = None) -> dict[str, np.ndarray]:
    """The WeightMap's tensors under the names and layouts compressed-tensors stores (int-quantized for
    Int8Weight, pack-quantized for PackedIntWeight; float tensors as they are). MoE layers need the config
    (a LlamaConfig): their experts are written per expert under the architecture's names."""
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": np.asarray(weights.embeddings),
                                  "model.norm.weight": np.asarray(weights.final_norm)}

    def put(prefix: str, lin: Any) -> None:
        w = lin.weight
        if isinstance(w, Int8Weight):
            out[prefix + ".weight"] = np.asarray(w.q)
            out[prefix + ".weight_scale"] = np.asarray(w.scale).reshape(-1) if w.scale.size == 1 \
                else np.asarray(w.scale)
            if w.zero_point is not None:
                out[prefix + ".weight_zero_point"] = np.asarray(w.zero_point)
        elif isinstance(w, PackedIntWeight):
            out[prefix + ".weight_packed"] = np.ascontiguousarray(w.packed)
            out[prefix + ".weight_scale"] = np.asarray(w.scale)
            out[prefix + ".weight_shape"] = np.array(w.shape, dtype=np.int64)
            if w.zero is not None:  # packed along dim 0, offset like the codes
                out[prefix + ".weight_zero_point"] = np.ascontiguousarray(pack_rows(np.asarray(w.zero).T, w.bits).T)
        else:
            out[prefix + ".weight"] = np.asarray(w)
        if lin.bias is not None:
            out[prefix + ".bias"] = np.asarray(lin.bias)

    for i, layer in enumerate(weights.layers):
        p = f"model.layers.{i}."
        for name, lin in vars(layer.self_attention).items():
            put(p + "self_attn." + name, lin)
        if hasattr(layer.mlp, "experts"):
            from refllama.formats.checkpoint import mlp_names

            if config is None:
                raise ConfigError("config", "an MoE model's experts are named by its architecture: pass its config")
            names = mlp_names(config)
            put(p + names.router, layer.mlp.router)
            experts = [(tuple(m.format(e=e) for m in names.experts), x) for e, x in enumerate(layer.mlp.experts)]
            if layer.mlp.shared_expert is not None:
                experts.append((names.shared, layer.mlp.shared_expert))
            for modules, expert in experts:
                for module, lin in zip(modules, (expert.gate_proj, expert.up_proj, expert.down_proj), strict=True):
                    put(p + module, lin)
        else:
            from refllama.formats.checkpoint import mlp_names

            modules = mlp_names(config).dense if config is not None else ("mlp.gate_proj", "mlp.up_proj",
                                                                          "mlp.down_proj")
            for module, lin in zip(modules, (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj),
                                   strict=True):
                put(p + module, lin)
        out[p + "input_layernorm.weight"] = np.asarray(layer.input_layernorm)
        out[p + "post_attention_layernorm.weight"] = np.asarray(layer.post_attention_layernorm)
    if weights.lm_head is not None:
        from refllama.model.weights import Linear

        put("lm_head", Linear(weights.lm_head))
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_compressed_tensors(folder: str | Path, hf_config: dict[str, Any], weights: Any,
                            quantization_config: dict[str, Any]) -> Path:
    """Write a quantized WeightMap as a compressed-tensors folder (model.safetensors + config.json) that
    transformers and refllama load."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = compressed_tensors_tensors(weights, LlamaConfig.from_dict(hf_config))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {**hf_config, "quantization_config": quantization_config}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
