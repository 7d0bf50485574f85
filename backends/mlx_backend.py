"""The MLX backend: the numpy backend's operations on `mlx.core` arrays (Metal on Apple silicon, CPU elsewhere).

What differs from NumPy, and why (docs/mlx.md has the measurements):
* MLX arrays are immutable values in a lazy graph. `cache_write` updates the preallocated KV buffer by slice
  assignment, which MLX performs in place when nothing else holds the old buffer, and schedules its evaluation
  (`mx.async_eval`) so that each step's graph starts from evaluated buffers instead of growing across steps.
* Conversions to the compute dtype happen on the host with NumPy/ml_dtypes, rounding once as the numpy backend
  does (`mx.array` would silently turn float64 into float32 first), and bfloat16 leaves through a uint16 view
  because MLX arrays do not export bfloat16 through the buffer protocol.
* `mx.fast.scaled_dot_product_attention` is used for attention and `mx.fast.rms_norm` for float32 RMSNorm;
  RoPE is written out because `mx.fast.rope` builds its own float32 tables instead of taking ours.
"""

from __future__ import annotations

import math

import ml_dtypes
import mlx.core as mx
import numpy as np

from refllama.config import ActivationType
from refllama.dtypes import DataType
from refllama.errors import BackendError
from refllama.weights import Linear

_ML_FLOATS = (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)
_MX_DTYPES = {DataType.F32: mx.float32, DataType.F16: mx.float16, DataType.BF16: mx.bfloat16}


class MlxBackend:
    name = "mlx"
    # No float64: Metal has none, and the numpy backend is the float64 reference.
    supported_dtypes = (DataType.F32, DataType.F16, DataType.BF16)

    def __init__(self, dtype: DataType = DataType.F32):
        if dtype not in self.supported_dtypes:
            names = ", ".join(d.value for d in self.supported_dtypes)
            raise BackendError(f"the mlx backend computes in {names}, not {dtype.value} "
                               f"(the numpy backend computes in float64)")
        self.dtype = dtype
        self.np_dtype = dtype.numpy_dtype
        self.mx_dtype = _MX_DTYPES[dtype]

    def asarray(self, a: np.ndarray) -> mx.array:
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating) or a.dtype.type in _ML_FLOATS:
            a = a.astype(self.np_dtype, copy=False)
        return mx.array(a)  # a copy into MLX memory: read-only and memory-mapped views are fine

    def to_numpy(self, a: mx.array) -> np.ndarray:
        if a.dtype == mx.bfloat16:
            return np.array(a.view(mx.uint16)).view(ml_dtypes.bfloat16)
        return np.array(a)  # a copy, so no host array aliases a buffer MLX may later update in place

    def zeros(self, shape: tuple[int, ...]) -> mx.array:
        return mx.zeros(shape, dtype=self.mx_dtype)

    def cache_write(self, buffer: mx.array, values: mx.array, start: int) -> mx.array:
        """Slice assignment: in place once the buffer is evaluated and held by nothing else (between steps)."""
        buffer[:, :, start:start + values.shape[2]] = values
        mx.async_eval(buffer)  # cut the graph here, so the next step's write starts from an evaluated buffer
        return buffer

    def embedding(self, table: mx.array, ids: mx.array) -> mx.array:
        return table[ids]

    def linear(self, x: mx.array, layer: Linear) -> mx.array:
        y = x @ layer.weight.T
        if layer.bias is not None:
            y = y + layer.bias
        return y

    def rms_norm(self, x: mx.array, weight: mx.array, eps: float) -> mx.array:
        """HF: normalise in float32, cast back, then multiply by the weight.

        mx.fast.rms_norm's Metal kernel multiplies by the weight before casting back (one rounding, not two),
        which matches HF only in float32; half types therefore take the written-out path.
        """
        if x.dtype == mx.float32:
            return mx.fast.rms_norm(x, weight, eps)
        x32 = x.astype(mx.float32)
        normed = x32 * mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return weight * normed.astype(x.dtype)

    def apply_rope(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        half = x.shape[-1] // 2
        rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def attention(self, q: mx.array, k: mx.array, v: mx.array, mask: mx.array) -> mx.array:
        """MLX's fused attention (GQA without repeating K/V; softmax in float32), plus a guard for empty rows.

        On CPU it masks with the dtype's most negative value, as the numpy backend does, so a fully masked row
        (a padding query) averages V uniformly; the fused GPU kernels mask with -inf and would give NaN there.
        Selecting the mean of V for such rows gives the numpy backend's answer on every device.
        """
        H, KV = q.shape[1], k.shape[1]
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask[:, None])
        some_allowed = mask.any(axis=-1)[:, None, :, None]  # (B, 1, T, 1)
        uniform = mx.repeat(v.mean(axis=2, keepdims=True), H // KV, axis=1)  # (B, H, 1, D)
        return mx.where(some_allowed, out, uniform)

    def gated_activation(self, gate: mx.array, up: mx.array, act: ActivationType) -> mx.array:
        """The activation in float32, rounded once to the compute dtype, as torch evaluates it for half inputs."""
        g = gate.astype(mx.float32)
        if act in (ActivationType.Silu, ActivationType.Swish):
            a = g / (1.0 + mx.exp(-g))
        elif act is ActivationType.Gelu:
            a = g * 0.5 * (1.0 + mx.erf(g * math.sqrt(0.5)))
        elif act is ActivationType.GeluTanh:
            a = 0.5 * g * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3)))
        elif act is ActivationType.Relu:
            a = mx.maximum(g, 0.0)
        else:  # pragma: no cover - ActivationType is closed
            raise BackendError(f"activation {act} not implemented")
        return a.astype(gate.dtype) * up
