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
* Quantized Linears (refllama/quant/types.py) are registered by type in `linear_kernels` (below the class). Weight-only
  ones run through `mx.quantized_matmul` in float32 where MLX's affine form (w = scale * u + bias, u unsigned
  codes in MLX's packing, which is our dense little-endian bit stream) holds the checkpoint's weights exactly,
  and are dequantized on the fly otherwise (`dequantize`, bit for bit the reference's); W8A8 quantizes its input
  per token and forms the integer accumulators exactly from float32 products over blocks of 1024 columns.
"""

from __future__ import annotations

import math

import ml_dtypes
import mlx.core as mx
import numpy as np

from refllama.backends.base import Backend
from refllama.config import ActivationType
from refllama.dtypes import DataType
from refllama.errors import BackendError
from refllama.quant.int8 import INT8_MAX_K
from refllama.quant.types import Int8Weight, PackedIntWeight

_ML_FLOATS = (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)
_MX_DTYPES = {DataType.F32: mx.float32, DataType.F16: mx.float16, DataType.BF16: mx.bfloat16}


class MlxBackend(Backend):
    name = "mlx"
    # No float64: Metal has none, and the numpy backend is the float64 reference.
    dtypes = (DataType.F32, DataType.F16, DataType.BF16)
    extra = "mlx"
    marker = "refllama_mlx"
    quantized_fallback = "reference"  # GGUF blocks never reach it (they are dequantized at load)

    def __init__(self, dtype: DataType = DataType.F32):
        if dtype not in self.dtypes:
            names = ", ".join(d.value for d in self.dtypes)
            raise BackendError(f"the mlx backend computes in {names}, not {dtype.value} "
                               f"(the numpy backend computes in float64)")
        self.dtype = dtype
        self.np_dtype = dtype.numpy_dtype
        self.mx_dtype = _MX_DTYPES[dtype]

    def asarray(self, a: np.ndarray) -> mx.array:
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating) or a.dtype.type in _ML_FLOATS:
            a = a.astype(self.np_dtype, copy=False)
        if any(stride < 0 for stride in a.strides):  # MLX takes no negative strides (a reversed view)
            a = a.copy()
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

    def matmul(self, x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
        y = x @ weight.T
        return y if bias is None else y + bias

    def _linear_int8(self, x: mx.array, weight: Int8Weight, bias: mx.array | None) -> mx.array:
        y = w8a8_matmul(x, weight) if weight.activation is not None else self._weight_only(x, weight)
        return y if bias is None else y + bias

    def _linear_packed(self, x: mx.array, weight: PackedIntWeight, bias: mx.array | None) -> mx.array:
        y = self._weight_only(x, weight)
        return y if bias is None else y + bias

    def _weight_only(self, x: mx.array, weight: Int8Weight | PackedIntWeight) -> mx.array:
        """W = (code - zero) * scale: MLX's quantized matmul in float32 where it holds W exactly, else on the fly.

        In half precision MLX's CPU quantized matmul was measured 10x further from the exact product than a half
        matmul of the dequantized weight (which accumulates in float32), so halves dequantize to the compute dtype,
        rounding W once as the reference `dequantize(weight, dtype)` and HF's decompression in the load dtype do.
        """
        form = affine_form(weight) if self.dtype is DataType.F32 else None
        if form is None:
            return x @ dequantize(weight, self.mx_dtype).T
        words, scales, biases, group_size, bits = form
        return mx.quantized_matmul(x, words, scales, biases, transpose=True, group_size=group_size, bits=bits)

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

    def apply_rope_interleaved(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        pairs = x.reshape(*x.shape[:-1], -1, 2)  # (B, H, T, D/2, 2)
        rotated = mx.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
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


# --- quantized Linears (refllama/quant/types.py) -----------------------------------------------------------------

MlxBackend.linear_kernels = {Int8Weight: MlxBackend._linear_int8, PackedIntWeight: MlxBackend._linear_packed}
BACKEND = MlxBackend

AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)  # mx.quantized_matmul's affine widths (7 is not offered)
AFFINE_GROUPS = (128, 64, 32)  # its group sizes; a per-channel row is split into the largest that divides it
W8A8_BLOCK = 2**24 // (128 * 128)  # 1024: float32 sums of at most this many int8 x int8 products are exact


def unpack_rows(packed: mx.array, bits: int, n: int) -> mx.array:
    """[rows, words] int32 -> [rows, n] uint32 codes: the first n codes of each row's little-endian bit stream.

    refllama/quant/packing.py's `unpack_rows` in MLX ops, on uint32 only (Metal has no 64-bit shifts to spare):
    a code that straddles two words takes its high bits from the next word shifted left by 32 - offset, written
    as (next << 1) << (31 - offset) so that no shift reaches 32 (an offset of 0 then contributes nothing).
    """
    if not 1 <= bits <= 8:
        raise BackendError(f"PackedIntWeight codes of {bits} bits cannot be unpacked (1..8)")
    words = packed.view(mx.uint32) if packed.dtype == mx.int32 else packed.astype(mx.uint32)
    rows, nwords = words.shape
    if nwords * 32 < n * bits:
        raise BackendError(f"{nwords} words per row cannot hold {n} codes of {bits} bits")
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # codes never straddle a word
        shifts = mx.arange(0, 32, bits, dtype=mx.uint32)  # (32 / bits,)
        codes = mx.right_shift(words[:, :, None], shifts) & mask  # (rows, words, 32 / bits)
        return codes.reshape(rows, -1)[:, :n]
    start = mx.arange(n, dtype=mx.int32) * bits
    word, offset = start // 32, (start % 32).astype(mx.uint32)
    low = mx.right_shift(mx.take(words, word, axis=1), offset)
    # The last word has no successor; its codes do not straddle, so reading it again adds only bits the mask drops.
    following = mx.take(words, mx.minimum(word + 1, nwords - 1), axis=1)
    high = mx.left_shift(mx.left_shift(following, 1), 31 - offset)
    return (low | high) & mask


def codes_and_zero(weight: Int8Weight | PackedIntWeight) -> tuple[mx.array, mx.array | int]:
    """The integer codes [out, in] and the zero they are measured from (an array [out, G] or a scalar)."""
    if isinstance(weight, Int8Weight):
        return weight.q, 0 if weight.zero_point is None else weight.zero_point
    codes = unpack_rows(weight.packed, weight.bits, weight.in_features)
    return codes, 1 << (weight.bits - 1) if weight.zero is None else weight.zero


def dequantize(weight: Int8Weight | PackedIntWeight, dtype: mx.Dtype = mx.float32) -> mx.array:
    """W = (code - zero) * scale, [out, in], rounded once to `dtype`: refllama.quant.types.dequantize in MLX ops.

    code - zero is an integer of at most 9 bits, exact in float32; the product with the scale is formed in float32
    (exact for bfloat16/float16 scales, one rounding for float32 ones, as the reference) and rounded to `dtype`.
    """
    codes, zero = codes_and_zero(weight)
    out_features, in_features = codes.shape
    scale = weight.scale.astype(mx.float32)
    if scale.ndim != 2 or scale.shape[0] not in (1, out_features):
        raise BackendError(f"scale of shape {list(scale.shape)} does not fit a [{out_features}, {in_features}] "
                           f"{type(weight).__name__}")
    centered = codes.astype(mx.float32)
    zero = zero.astype(mx.float32) if isinstance(zero, mx.array) else float(zero)
    group_size = weight.group_size
    if weight.g_idx is None and group_size is None:  # one scale (and zero) per row, or per tensor
        if isinstance(zero, mx.array):
            zero = zero[:, :1]
        return ((centered - zero) * scale[:, :1]).astype(dtype)
    if weight.g_idx is None and in_features % group_size == 0:  # whole groups: broadcast, no gather
        groups = in_features // group_size
        centered = centered.reshape(out_features, groups, group_size)
        if isinstance(zero, mx.array):
            zero = zero[:, :, None]
        w = (centered - zero) * scale[:, :, None]
        return w.reshape(out_features, in_features).astype(dtype)
    if weight.g_idx is not None:
        cols = weight.g_idx.astype(mx.int32)
    else:  # a ragged last group
        cols = mx.arange(in_features, dtype=mx.int32) // group_size
    if isinstance(zero, mx.array):
        zero = mx.take(zero, cols, axis=1)
    return ((centered - zero) * mx.take(scale, cols, axis=1)).astype(dtype)


def affine_form(weight: Int8Weight | PackedIntWeight) -> tuple[mx.array, mx.array, mx.array, int, int] | None:
    """(words, scales, biases, group_size, bits) for `mx.quantized_matmul`, or None where MLX cannot hold W.

    MLX's affine mode means w = scale * u + bias per group of `group_size` consecutive inputs, u unsigned codes
    packed LSB first into uint32 words: for every width 1..6 and 8 that is our dense little-endian bit stream, so
    PackedIntWeight's words are used as they are (a uint32 view), and int8 codes are MLX's 8-bit layout once each
    byte's sign bit is flipped (u = q + 128). With bias = -zero * scale (zero in u's domain), scale * u + bias =
    (u - zero) * scale: symmetric and asymmetric weights alike. Both products and the sum are exact in float32 for
    bfloat16/float16 scales (at most 9 + 11 significant bits), so MLX computes the reference's W; with float32
    scales each can round (measured within 1 ulp of W). Not representable: GPTQ act-order (g_idx: MLX's groups are
    runs of consecutive inputs), a group size other than 32/64/128 or one that does not divide the row, and 7-bit
    codes. A per-channel or per-tensor scale is repeated over groups of the largest size that divides the row.
    """
    if weight.g_idx is not None:
        return None
    out_features, in_features = weight.shape
    bits = 8 if isinstance(weight, Int8Weight) else weight.bits
    group_size = weight.group_size
    if group_size is None:
        group_size = next((g for g in AFFINE_GROUPS if in_features % g == 0), None)
    if bits not in AFFINE_BITS or group_size not in AFFINE_GROUPS or in_features % group_size:
        return None
    groups = in_features // group_size
    scale = weight.scale
    if weight.group_size is None:
        scale = scale[:, :1]
    if scale.ndim != 2 or scale.shape[0] not in (1, out_features) or scale.shape[1] not in (1, groups):
        return None
    if isinstance(weight, Int8Weight):
        if weight.q.dtype != mx.int8:
            return None
        words = mx.bitwise_xor(weight.q.view(mx.uint32), 0x80808080)  # q + 128 in every byte
        zero = 128 if weight.zero_point is None else weight.zero_point.astype(mx.float32) + 128
    else:
        words = weight.packed.view(mx.uint32) if weight.packed.dtype == mx.int32 else weight.packed
        if words.dtype != mx.uint32 or words.shape[1] != in_features * bits // 32:
            return None
        zero = 1 << (bits - 1) if weight.zero is None else weight.zero.astype(mx.float32)
    if isinstance(zero, mx.array):
        if weight.group_size is None:
            zero = zero[:, :1]
        if zero.ndim != 2 or zero.shape[1] not in (1, groups):
            return None
    shape = (out_features, groups)
    scales = mx.broadcast_to(scale, shape)
    biases = mx.broadcast_to(-(zero * scale), shape)
    return words, scales, biases, group_size, bits


def quantize_tokens_hf(x: mx.array) -> tuple[mx.array, mx.array]:
    """compressed-tensors' dynamic per-token int8 (refllama.quant.int8.quantize_tokens_hf): codes as float32
    integers in [-128, 127] and the scale [..., 1], computed in x's dtype (scale = absmax / 127.5, eps for a zero
    row; codes rint(clip(x / scale, -128, 127)), mx.round rounding half to even)."""
    absmax = mx.max(mx.abs(x), axis=-1, keepdims=True)
    scale = absmax / 127.5  # a Python scalar keeps x's dtype
    scale = mx.where(scale == 0, mx.array(mx.finfo(x.dtype).eps, x.dtype), scale)
    codes = mx.round(mx.clip(x / scale, -128, 127))
    return codes.astype(mx.float32), scale


def quantize_tokens_vllm(x: mx.array) -> tuple[mx.array, mx.array]:
    """vLLM's dynamic per-token int8 in float32 (refllama.quant.int8.quantize_tokens_vllm): codes as float32
    integers rint(x * (127 / absmax)) (0 for an all-zero row) and the float32 scale absmax / 127."""
    x32 = x.astype(mx.float32)
    absmax = mx.max(mx.abs(x32), axis=-1, keepdims=True)
    scale = absmax / 127.0
    scaled = mx.where(absmax > 0, x32 * (127.0 / absmax), 0.0)  # a multiply by the reciprocal, as the kernel
    return mx.round(mx.clip(scaled, -128, 127)), scale


def int8_accumulate(codes: mx.array, q: mx.array) -> mx.array:
    """acc[m, n] = sum_k codes[m, k] * q[n, k] exactly, as float32 (K <= 1024) or int32.

    MLX has no integer matmul. Float32 products of int8 values are exact (|product| <= 2**14), and every partial
    sum over at most 1024 of them is an integer of magnitude <= 2**24, which float32 holds, so a float32 matmul
    over a block of 1024 columns is exact in any summation order or blocking (FMA included). Longer rows sum their
    blocks' accumulators in int32, so the result is exact for K up to refllama.quant.int8.INT8_MAX_K.
    """
    K = codes.shape[-1]
    if q.shape[-1] != K:
        raise BackendError(f"inner dimensions differ: {codes.shape} @ {q.shape}.T")
    if K > INT8_MAX_K:
        raise BackendError(f"an int32 accumulator overflows for K = {K} > {INT8_MAX_K}")
    w = q.astype(mx.float32)
    if K <= W8A8_BLOCK:
        return codes @ w.T
    acc = None
    for k in range(0, K, W8A8_BLOCK):
        block = (codes[:, k:k + W8A8_BLOCK] @ w[:, k:k + W8A8_BLOCK].T).astype(mx.int32)
        acc = block if acc is None else acc + block
    return acc


def w8a8_matmul(x: mx.array, weight: Int8Weight) -> mx.array:
    """y = x @ W.T for a W8A8 Linear: per-token int8 codes of x times the int8 weight codes, then the scales.

    float32 follows refllama.quant.int8.w8a8_matmul operation by operation: "hf" as (float(acc) * w_scale) *
    x_scale, "vllm" as x_scale * (w_scale * float(acc)). In half precision the codes are computed the same way
    (the "hf" token scale in the half type, as compressed-tensors does), but both epilogues run in float32 and round
    once: float16 cannot hold the accumulators (up to K * 2**14), and vLLM's epilogue is float32 for half inputs.
    """
    if weight.zero_point is not None or weight.group_size is not None or weight.g_idx is not None:
        raise BackendError("the mlx backend runs W8A8 (Int8Weight with activation quantization) only with "
                           "symmetric per-channel or per-tensor weights")
    semantics = weight.activation.semantics
    dtype = x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if semantics == "hf":
        codes, x_scale = quantize_tokens_hf(x2)
    elif semantics == "vllm":
        codes, x_scale = quantize_tokens_vllm(x2)
    else:
        raise BackendError(f"unknown activation quantization semantics {semantics!r} (hf, vllm)")
    acc = int8_accumulate(codes, weight.q).astype(mx.float32)  # (M, N); rounds only past 2**24, as the reference
    w_scale = weight.scale.reshape(1, -1).astype(mx.float32)  # (1, N) per channel or (1, 1) per tensor
    x_scale = x_scale.astype(mx.float32)
    y = (acc * w_scale) * x_scale if semantics == "hf" else x_scale * (w_scale * acc)
    return y.astype(dtype).reshape(*lead, -1)
