"""The reference backend: plain NumPy in float32 or float64, no tricks. Every other backend is tested against it.

Numerics follow transformers' eager Llama where it matters: RMSNorm normalises in (at least) float32 and
multiplies by the weight after casting back; attention scores are scaled after the q.k product; the softmax
subtracts the row maximum; masked scores take the dtype's most negative value, not -inf, so a fully masked
row (a padding query) stays finite.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from refllama.config import ActivationType
from refllama.dtypes import DataType
from refllama.errors import BackendError
from refllama.quant.int8 import w8a8_matmul
from refllama.quant.types import Int8Weight, PackedIntWeight, dequantize
from refllama.weights import Linear

# numpy has no erf ufunc (it lives in scipy, which we do not depend on); math.erf is correctly rounded in
# float64, and the exact-GELU models that need it are rare and small, so a vectorised wrapper is enough.
_erf = np.frompyfunc(math.erf, 1, 1)
_ML_FLOATS = (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)


class NumpyBackend:
    name = "numpy"
    supported_dtypes = (DataType.F32, DataType.F64)

    def __init__(self, dtype: DataType = DataType.F32):
        if dtype not in self.supported_dtypes:
            names = ", ".join(d.value for d in self.supported_dtypes)
            raise BackendError(f"the numpy backend computes in {names}, not {dtype.value}")
        self.dtype = dtype
        self.np_dtype = dtype.numpy_dtype

    def asarray(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating) or a.dtype.type in _ML_FLOATS:
            return a.astype(self.np_dtype, copy=False)
        return a

    def to_numpy(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a)

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=self.np_dtype)

    def cache_write(self, buffer: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
        buffer[:, :, start:start + values.shape[2]] = values
        return buffer

    def embedding(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return table[ids]

    def linear(self, x: np.ndarray, layer: Linear) -> np.ndarray:
        quantized = _QUANTIZED_LINEAR.get(type(layer.weight))
        if quantized is not None:
            return quantized(self, x, layer)
        y = x @ layer.weight.T
        if layer.bias is not None:
            y = y + layer.bias
        return y

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        variance = np.mean(x * x, axis=-1, keepdims=True)
        return weight * (x * (1.0 / np.sqrt(variance + eps)).astype(x.dtype))

    def apply_rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
        B, H, T, D = q.shape
        KV = k.shape[1]
        q = q.reshape(B, KV, H // KV, T, D)  # query head h = kv * groups + g
        # One (B, KV, G, T, S) buffer, updated in place: the same arithmetic as the textbook expression
        # without its three score-sized temporaries.
        scores = q @ k[:, :, None].swapaxes(-1, -2)  # (B, KV, G, T, S)
        scores *= np.asarray(D**-0.5, dtype=q.dtype)
        np.copyto(scores, np.finfo(scores.dtype).min, where=~mask[:, None, None])
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = scores @ v[:, :, None]  # (B, KV, G, T, D)
        return out.reshape(B, H, T, D)

    def gated_activation(self, gate: np.ndarray, up: np.ndarray, act: ActivationType) -> np.ndarray:
        if act in (ActivationType.Silu, ActivationType.Swish):
            a = gate / (1.0 + np.exp(-gate))
        elif act is ActivationType.Gelu:
            a = gate * 0.5 * (1.0 + _erf(gate * math.sqrt(0.5)).astype(gate.dtype))
        elif act is ActivationType.GeluTanh:
            a = 0.5 * gate * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3)))
        elif act is ActivationType.Relu:
            a = np.maximum(gate, 0)
        else:  # pragma: no cover - ActivationType is closed
            raise BackendError(f"activation {act} not implemented")
        return a * up


# --- quantized Linears: dispatch on the weight's type (refllama/quant/types.py) ----------------------------------

def _linear_int8(backend: NumpyBackend, x: np.ndarray, layer: Linear) -> np.ndarray:
    """W8A8: per-token int8 activations times int8 weights in the integer domain (exact accumulators, then the
    scales; refllama/quant/int8.py). Weight-only int8: dequantize, then a float matmul."""
    w: Int8Weight = layer.weight
    if w.activation is None:
        return _linear_dequantized(backend, x, layer)
    y = w8a8_matmul(x, w.q, w.scale, w.activation.semantics)  # (..., out)
    return y + layer.bias if layer.bias is not None else y


def _linear_dequantized(backend: NumpyBackend, x: np.ndarray, layer: Linear) -> np.ndarray:
    """Weight-only (WxA16, GPTQ, AWQ): W = (code - zero) * scale in the compute dtype on the fly, then x @ W.T.
    Exact in float32 for bf16/f16 scales, so this is the checkpoint's exact function up to the matmul."""
    y = x @ dequantize(layer.weight, backend.np_dtype).T  # (..., in) @ (in, out)
    return y + layer.bias if layer.bias is not None else y


_QUANTIZED_LINEAR = {Int8Weight: _linear_int8, PackedIntWeight: _linear_dequantized}
