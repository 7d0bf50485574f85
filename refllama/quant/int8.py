"""W8A8 in the integer domain: per-token activation quantization, exact int32 accumulators, then the scales.

Two named semantics for the activation step (docs/quantization.md):

* "hf": compressed-tensors' formula, which HF transformers runs (`quantization/utils/helpers.py`,
  `calculate_qparams`; `lifecycle/forward_helpers.py`, `_quantize`): scale = absmax / 127.5 in the activation
  dtype (an all-zero row gets the dtype's eps), codes = rint(clip(x / scale, -128, 127)). A row whose
  largest-magnitude element is negative puts that element exactly on -127.5, a rounding tie decided by the last
  bit of the scale: -128 or -127.
* "vllm": vLLM's `dynamic_scaled_int8_quant_kernel`, in float32: scale = absmax / 127,
  codes = rint(x * (127 / absmax)) (a multiply by the reciprocal, not a division); an all-zero row gets scale 0
  and codes 0. The absmax element maps to +-127, never a tie.

Both then accumulate acc[m, n] = sum_k codes[m, k] * w[n, k] exactly in int32 and apply the scales: "hf" as
(acc * w_scale) * x_scale in the compute dtype, "vllm" as vLLM's epilogue x_scale * (w_scale * float32(acc)).
"""

from __future__ import annotations

import numpy as np

from refllama.errors import BackendError

INT8_MAX_K = (2**31 - 1) // (128 * 128)  # |acc| <= K * 128 * 128 must fit int32: K <= 131071


def quantize_tokens_hf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """compressed-tensors' dynamic per-token int8: codes int8 [..., K] and scale [..., 1] in x's dtype."""
    import ml_dtypes  # here, not at the top: its import is slow (refllama/dtypes.py)

    x = np.asarray(x)
    absmax = np.max(np.abs(x), axis=-1, keepdims=True)  # = max(|min(x, 0)|, max(x, 0)), as calculate_qparams
    scale = absmax / x.dtype.type(127.5)  # (255 / 2), in the activation dtype
    scale = np.where(scale == 0, ml_dtypes.finfo(x.dtype).eps, scale).astype(x.dtype)  # ml_dtypes: bf16 too
    codes = np.rint(np.clip(x / scale, -128, 127))  # clamp, then round half to even
    return codes.astype(np.int8), scale


def quantize_tokens_vllm(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's dynamic per-token int8 (float32 kernel): codes int8 [..., K] and float32 scale [..., 1]."""
    x32 = np.asarray(x, dtype=np.float32)
    absmax = np.max(np.abs(x32), axis=-1, keepdims=True)
    scale = absmax / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = np.float32(127) / absmax  # inf for an all-zero row
        scaled = x32 * inverse  # 0 * inf = nan there; the kernel's saturating convert makes it 0
    codes = np.rint(np.clip(np.nan_to_num(scaled, nan=0.0), -128, 127))
    return codes.astype(np.int8), scale


def int8_accumulate(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """acc[m, n] = sum_k a[m, k] * w[n, k] for int8 a [M, K] and w [N, K], exactly, as int32 [M, N].

    Computed with float64 BLAS, which is exact here: every product is an integer of magnitude <= 2**14, and every
    partial sum, in whatever order or blocking BLAS adds them (FMA included), is an integer of magnitude
    <= K * 2**14 < 2**53, so no addition rounds. (np.matmul on int8 is not BLAS-backed, hundreds of times
    slower, and plain int8 @ int8 wraps.) K <= 131071 keeps the true sum inside int32, as a real int32
    accumulator needs.
    """
    if a.dtype != np.int8 or w.dtype != np.int8:
        raise BackendError(f"int8_accumulate takes int8 operands, got {a.dtype} and {w.dtype}")
    K = a.shape[-1]
    if w.shape[-1] != K:
        raise BackendError(f"inner dimensions differ: {a.shape} @ {w.shape}.T")
    if K > INT8_MAX_K:
        raise BackendError(f"an int32 accumulator overflows for K = {K} > {INT8_MAX_K}")
    acc = a.astype(np.float64) @ w.astype(np.float64).T  # exact integers (see above)
    return acc.astype(np.int32)


def w8a8_matmul(x: np.ndarray, w_q: np.ndarray, w_scale: np.ndarray, semantics: str) -> np.ndarray:
    """y = x @ W.T for W = w_q * w_scale (int8 [N, K], scale [N, 1] or [1, 1]) with x quantized per token.

    x (..., K) in the compute dtype -> y (..., N) in the compute dtype.
    """
    dtype = x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    ws = np.asarray(w_scale).reshape(1, -1)  # (1, N) per channel or (1, 1) per tensor
    if semantics == "hf":
        codes, xs = quantize_tokens_hf(x2)  # (M, K) int8, (M, 1) in the compute dtype
        acc = int8_accumulate(codes, w_q)  # (M, N) int32, exact
        y = (acc.astype(dtype) * ws.astype(dtype)) * xs
    elif semantics == "vllm":
        codes, xs = quantize_tokens_vllm(x2)  # (M, K) int8, (M, 1) float32
        acc = int8_accumulate(codes, w_q)
        # vLLM's epilogue: float(acc) first times the weight scale, then the token scale (float32 on the GPU;
        # a float64 engine keeps float64).
        ep = np.float32 if dtype == np.float32 else dtype
        y = xs.astype(ep) * (ws.astype(ep) * acc.astype(ep))
    else:
        raise BackendError(f"unknown activation quantization semantics {semantics!r} (hf, vllm)")
    return y.astype(dtype, copy=False).reshape(*lead, -1)
