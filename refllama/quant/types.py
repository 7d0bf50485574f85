"""Quantized Linear weights as plain data, and their one reference dequantization.

Every quantized checkpoint format is loaded into one of two types, so each backend implements two cases:

* `Int8Weight`: signed codes stored one per int8 (compressed-tensors `int-quantized` / `naive-quantized`, and
  weights quantized at load to 8 bits). With `activation` set it is a W8A8 Linear: the input is quantized per
  token and multiplied in the integer domain (refllama/quant/int8.py).
* `PackedIntWeight`: unsigned b-bit codes packed densely into int32 words along the input dimension, as
  compressed-tensors `pack-quantized` stores them (GPTQ's qweight is the same bits, transposed; AWQ is repacked
  once at load). Always weight-only (WxA16).

Both mean W[o, i] = (code[o, i] - zero[o, g(i)]) * scale[o, g(i)], with g(i) = g_idx[i] when stored (GPTQ
act-order) and i // group_size otherwise (0 for per-channel and per-tensor). `dequantize` computes exactly that,
in one place. Each weight carries its reference arithmetic as methods, `weight.dequantize(dtype)` and
`weight.matmul(x)` (= x @ W.T as the checkpoint means it): the numpy backend runs these, a backend without a
kernel for the type may fall back to them, and every kernel is tested against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from refllama.errors import InputError, WeightError
from refllama.quant.int8 import w8a8_matmul
from refllama.quant.packing import unpack_rows

Array = Any  # numpy here; a backend's own array type after WeightMap.map

SEMANTICS = ("hf", "vllm")


@dataclass(frozen=True)
class ActivationQuant:
    """Dynamic, symmetric, per-token int8 quantization of a Linear's input (the "A8" of W8A8).

    semantics "hf": compressed-tensors' formula, scale = absmax / 127.5 in the activation dtype, codes
    clip(rint(x / scale), -128, 127) (what HF transformers runs); "vllm": vLLM's kernel, scale = absmax / 127
    in float32, codes rint(x * (127 / absmax)). See refllama/quant/int8.py.
    """

    semantics: str = "hf"

    def __post_init__(self) -> None:
        if self.semantics not in SEMANTICS:
            raise InputError(f"activation quantization semantics must be one of {SEMANTICS}, got {self.semantics!r}")


@dataclass(frozen=True, eq=False)
class Int8Weight:
    """Signed integer codes, one per int8, [out, in] as stored (a zero-copy view of the checkpoint)."""

    q: Array  # int8 [out, in]
    scale: Array  # float [out, n_groups], or [1, 1] for one per-tensor scale
    zero_point: Array | None = None  # int8, same shape as scale; None: symmetric
    group_size: int | None = None  # None: one group spans the row (per-channel / per-tensor)
    g_idx: Array | None = None  # int32 [in]: group of each input column, when not i // group_size
    activation: ActivationQuant | None = None  # set: W8A8 (integer GEMM); None: weight-only

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        return dequantize(self, dtype)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x (..., in) @ W.T -> (..., out) in x's dtype. W8A8: x quantized per token, an exact integer product,
        then the scales (refllama/quant/int8.py); weight-only: W dequantized in x's dtype, then a float matmul
        (exact W in float32 for bf16/f16 scales, so this is the checkpoint's function up to the matmul)."""
        if self.activation is not None:
            return w8a8_matmul(x, self.q, self.scale, self.activation.semantics)
        return x @ dequantize(self, x.dtype).T


@dataclass(frozen=True, eq=False)
class PackedIntWeight:
    """Unsigned `bits`-bit codes, a dense little-endian bit stream per row: code i at bits [i*b, i*b + b)."""

    packed: Array  # int32 [out, ceil(in * bits / 32)] (may be a strided view: GPTQ's qweight transposed)
    scale: Array  # float [out, n_groups], or [1, 1]
    bits: int
    in_features: int
    zero: Array | None = None  # int32 [out, n_groups], unsigned domain; None: 2 ** (bits - 1) (symmetric)
    group_size: int | None = None
    g_idx: Array | None = None  # int32 [in]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.packed.shape[0]), self.in_features)

    def dequantize(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        return dequantize(self, dtype)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x (..., in) @ W.T -> (..., out): W dequantized in x's dtype, then a float matmul (weight-only)."""
        return x @ dequantize(self, x.dtype).T


QuantizedWeight = Int8Weight | PackedIntWeight
QUANTIZED_TYPES = (Int8Weight, PackedIntWeight)


def is_quantized(weight: Any) -> bool:
    return isinstance(weight, QUANTIZED_TYPES)


def codes_and_zero(weight: QuantizedWeight) -> tuple[np.ndarray, np.ndarray | int]:
    """The integer codes [out, in] (int16) and the zero they are measured from (array [out, G] or a scalar)."""
    if isinstance(weight, Int8Weight):
        codes = np.asarray(weight.q).astype(np.int16)
        zero = 0 if weight.zero_point is None else np.asarray(weight.zero_point).astype(np.int16)
        return codes, zero
    codes = unpack_rows(np.asarray(weight.packed), weight.bits, weight.in_features).astype(np.int16)
    zero = 1 << (weight.bits - 1) if weight.zero is None else np.asarray(weight.zero).astype(np.int16)
    return codes, zero


def group_index(weight: QuantizedWeight) -> np.ndarray | None:
    """g(i) for every input column, or None when one group spans the row."""
    in_features = weight.shape[1]
    if weight.g_idx is not None:
        return np.asarray(weight.g_idx).astype(np.intp)
    if weight.group_size is None:
        return None
    return np.arange(in_features) // weight.group_size


def dequantize(weight: QuantizedWeight, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """W = (code - zero) * scale, [out, in], computed in `dtype` (float32 by default).

    (code - zero) is an integer of at most 9 bits; with a bf16 or f16 scale the product needs at most 20 bits of
    mantissa, so float32 holds it exactly: this is the exact function of the checkpoint (HF's float32 decompress
    and the golden files' `*_f32dequant` reference compute the same). With float32 scales, float32 rounds the
    product once, as HF does in float32.
    """
    dtype = np.dtype(dtype)
    codes, zero = codes_and_zero(weight)
    scale = np.asarray(weight.scale)
    out_features, in_features = codes.shape
    if scale.ndim != 2 or scale.shape[0] not in (1, out_features):
        raise WeightError(f"scale of shape {list(scale.shape)} does not fit a [{out_features}, {in_features}] weight")
    cols = group_index(weight)
    if cols is None:  # one scale (and zero) per row, or per tensor
        centered = codes - zero if np.ndim(zero) == 0 else codes - np.asarray(zero)[:, :1]
        return centered.astype(dtype) * scale[:, :1].astype(dtype)
    if np.ndim(zero) == 0:
        centered = codes - zero
    else:
        centered = codes - np.asarray(zero)[:, cols]
    return centered.astype(dtype) * scale[:, cols].astype(dtype)
