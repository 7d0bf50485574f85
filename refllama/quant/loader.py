"""Quantized checkpoint tensors -> Int8Weight / PackedIntWeight, with the tensor names and shapes each format needs.

`plan_linears` decides, from the QuantizationConfig, what every Linear of the model is stored as; `tensor_specs`
lists the tensors that storage must have (formats/checkpoint.py checks them all, with the float ones, before anything is
read); `build_weight` assembles the weight object from zero-copy views. Layouts (docs/quantization.md):

* ct-int: weight I8 [out, in], weight_scale, weight_zero_point (asym), weight_g_idx (optional)
  -> Int8Weight over views;
* ct-pack: weight_packed I32 [out, in*b/32], weight_scale, weight_shape I64 [2], weight_zero_point
  I32 [out*b/32, G] (asym; packed along dim 0), weight_g_idx (optional) -> PackedIntWeight over views;
* gptq: qweight I32 [in*b/32, out], qzeros I32 [G, out*b/32] (v1 stores zero - 1), scales [G, out],
  g_idx I32 [in] -> PackedIntWeight over qweight.T (a view: the same bit stream);
* awq: qweight I32 [in, out/8], qzeros I32 [G, out/8] (AWQ nibble order), scales [G, out]
  -> PackedIntWeight, repacked once along the input dimension (same size).

weight_scale is [1] per tensor, [out, 1] per channel, [out, G] per group; G = ceil(in / group_size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from refllama.errors import ConfigError, WeightError
from refllama.quant.config import QuantizationConfig, QuantizationMethod, QuantizationSpec, check_runnable
from refllama.quant.packing import pack_rows, packed_words, unpack_awq, unpack_rows
from refllama.quant.types import ActivationQuant, Int8Weight, PackedIntWeight, QuantizedWeight

FLOAT = ("F64", "F32", "F16", "BF16")
LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]
    optional: bool = False


@dataclass(frozen=True)
class LinearPlan:
    """How one quantized Linear is stored and run."""

    kind: str  # "ct-int" | "ct-pack" | "gptq" | "awq"
    spec: QuantizationSpec
    activation: bool = False  # input activations quantized per token (W8A8)
    zero_offset: int = 0  # added to stored zeros: 1 for GPTQ v1 ("zero - 1" on disk)

    @property
    def scheme(self) -> str:
        s = self.spec
        return f"{self.kind} W{s.num_bits}A{8 if self.activation else 16} {s.strategy}" + \
            (f" g{s.group_size}" if s.group_size else "") + ("" if s.symmetric else " asym")


def plan_linears(q: QuantizationConfig, modules: list[str]) -> dict[str, LinearPlan | None]:
    """Every Linear module name -> its LinearPlan, or None where it stays float. Unrunnable schemes raise."""
    check_runnable(q)
    if q.method is QuantizationMethod.CompressedTensors and q.scheme_for("model.embed_tokens", "Embedding"):
        raise ConfigError("quantization_config.config_groups", "quantized embeddings (model.embed_tokens) are "
                          "not supported")
    plans: dict[str, LinearPlan | None] = {}
    for module in modules:
        group = q.scheme_for(module)
        if group is None or group.weights is None:
            plans[module] = None
        elif q.method is QuantizationMethod.CompressedTensors:
            kind = "ct-pack" if q.group_format(group) == "pack-quantized" else "ct-int"
            plans[module] = LinearPlan(kind, group.weights, activation=group.input_activations is not None)
        elif q.method is QuantizationMethod.GPTQ:
            plans[module] = LinearPlan("gptq", group.weights, zero_offset=1 if q.format == "gptq" else 0)
        else:
            plans[module] = LinearPlan("awq", group.weights)
    return plans


def n_groups(spec: QuantizationSpec, in_features: int) -> int:
    return -(-in_features // spec.group_size) if spec.group_size else 1


def _scale_shape(spec: QuantizationSpec, out_features: int, in_features: int) -> tuple[int, ...]:
    if spec.strategy == "tensor":
        return (1,)
    return (out_features, n_groups(spec, in_features))


def tensor_specs(plan: LinearPlan, prefix: str, out_features: int, in_features: int) -> dict[str, TensorSpec]:
    """The tensors a quantized Linear `prefix` must (or may) have, by name, with shapes and dtypes."""
    s, p = plan.spec, prefix + "."
    G = n_groups(s, in_features)
    g_idx = TensorSpec((in_features,), ("I32", "I64"), optional=True)
    if plan.kind in ("ct-int", "ct-pack"):
        scale_shape = _scale_shape(s, out_features, in_features)
        specs = {p + "weight_scale": TensorSpec(scale_shape, FLOAT)}
        if plan.kind == "ct-int":
            specs[p + "weight"] = TensorSpec((out_features, in_features), ("I8",))
            if not s.symmetric:
                specs[p + "weight_zero_point"] = TensorSpec(scale_shape, ("I8", "I32"))
        else:
            specs[p + "weight_packed"] = TensorSpec((out_features, packed_words(in_features, s.num_bits)), ("I32",))
            specs[p + "weight_shape"] = TensorSpec((2,), ("I64", "I32"))
            if not s.symmetric:
                packed_zp = s.strategy in ("group", "channel")
                specs[p + "weight_zero_point"] = (
                    TensorSpec((packed_words(out_features, s.num_bits), G), ("I32",)) if packed_zp
                    else TensorSpec(scale_shape, ("I8", "I32")))
        specs[p + "weight_g_idx"] = g_idx
        return specs
    if plan.kind == "gptq":
        b = s.num_bits
        return {p + "qweight": TensorSpec((packed_words(in_features, b), out_features), ("I32",)),
                p + "qzeros": TensorSpec((G, packed_words(out_features, b)), ("I32",)),
                p + "scales": TensorSpec((G, out_features), FLOAT),
                p + "g_idx": g_idx}
    return {p + "qweight": TensorSpec((in_features, packed_words(out_features, 4)), ("I32",)),
            p + "qzeros": TensorSpec((G, packed_words(out_features, 4)), ("I32",)),
            p + "scales": TensorSpec((G, out_features), FLOAT)}


def build_weight(plan: LinearPlan, prefix: str, get: Callable[[str], np.ndarray], has: Callable[[str], bool],
                 out_features: int, in_features: int, semantics: str = "hf") -> QuantizedWeight:
    """Assemble a Linear's weight object from its stored tensors (views, except where a layout must change)."""
    s, p = plan.spec, prefix + "."
    G = n_groups(s, in_features)
    group_size = s.group_size
    if plan.kind in ("ct-int", "ct-pack"):
        scale = _as_2d(get(p + "weight_scale"), s, out_features, in_features)
        g_idx = _g_idx(get(p + "weight_g_idx"), s, in_features, prefix) if has(p + "weight_g_idx") else None
        if plan.kind == "ct-int":
            zp = None if s.symmetric else _as_2d(get(p + "weight_zero_point"), s, out_features, in_features)
            if zp is not None and zp.dtype != np.int8:
                zp = _narrow(zp, np.int8, p + "weight_zero_point")
            activation = ActivationQuant(semantics) if plan.activation else None
            return Int8Weight(get(p + "weight"), scale, zp, group_size, g_idx, activation)
        stored_shape = [int(v) for v in np.asarray(get(p + "weight_shape"))]
        if stored_shape != [out_features, in_features]:
            raise WeightError(f"weight_shape says {stored_shape}, the config needs [{out_features}, {in_features}]",
                              tensor=p + "weight_shape")
        zero = None
        if not s.symmetric:
            stored = get(p + "weight_zero_point")
            offset = 1 << (s.num_bits - 1)
            if s.strategy in ("group", "channel"):  # packed along dim 0, offset like the codes
                zero = unpack_rows(np.ascontiguousarray(stored.T), s.num_bits, out_features).T.astype(np.int32)
            else:
                zero = _as_2d(stored, s, out_features, in_features).astype(np.int32) + offset
        return PackedIntWeight(get(p + "weight_packed"), scale, s.num_bits, in_features, zero, group_size, g_idx)
    if plan.kind == "gptq":
        b = s.num_bits
        zeros = unpack_rows(get(p + "qzeros"), b, out_features).astype(np.int32) + plan.zero_offset  # (G, out)
        g_idx = _g_idx(get(p + "g_idx"), s, in_features, prefix) if has(p + "g_idx") else None
        return PackedIntWeight(get(p + "qweight").T, get(p + "scales").T, b, in_features,
                               _symmetric_zero(zeros.T, b), group_size, g_idx)
    # AWQ: repack [in, out/8] in AWQ order into the canonical [out, in/8] (4 bits, same size)
    codes = unpack_awq(get(p + "qweight"))  # (in, out)
    packed = pack_rows(np.ascontiguousarray(codes.T), 4)  # (out, in/8)
    zeros = unpack_awq(get(p + "qzeros")).astype(np.int32)  # (G, out)
    assert zeros.shape == (G, out_features)
    return PackedIntWeight(packed, get(p + "scales").T, 4, in_features, _symmetric_zero(zeros.T, 4), group_size)


def _as_2d(a: np.ndarray, s: QuantizationSpec, out_features: int, in_features: int) -> np.ndarray:
    """Scales and zero points as [out, G] (channel: G = 1), or [1, 1] per tensor (views)."""
    return a.reshape(1, 1) if s.strategy == "tensor" else a.reshape(out_features, n_groups(s, in_features))


def _narrow(a: np.ndarray, dtype: type, name: str) -> np.ndarray:
    info = np.iinfo(dtype)
    if a.size and (a.min() < info.min or a.max() > info.max):
        raise WeightError(f"values outside {np.dtype(dtype).name}", tensor=name)
    return a.astype(dtype)


def _g_idx(g: np.ndarray, s: QuantizationSpec, in_features: int, prefix: str) -> np.ndarray | None:
    """A stored g_idx, or None where it is the plain i // group_size (GPTQ without act-order writes that too)."""
    g = np.asarray(g)
    G = n_groups(s, in_features)
    if g.size and (g.min() < 0 or g.max() >= G):
        raise WeightError(f"g_idx values must lie in [0, {G})", tensor=prefix + ".g_idx")
    regular = np.arange(in_features) // s.group_size if s.group_size else np.zeros(in_features, np.int64)
    return None if np.array_equal(g, regular) else g.astype(np.int32)


def _symmetric_zero(zero: np.ndarray, bits: int) -> np.ndarray | None:
    """None when every zero is the symmetric 2**(bits-1) (lets backends take the symmetric path)."""
    return None if np.all(zero == 1 << (bits - 1)) else np.ascontiguousarray(zero)
