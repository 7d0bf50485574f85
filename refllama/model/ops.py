"""The arithmetic of every operation the forward pass calls, as plain NumPy functions: the reference.

Read these beside `llama.py`, which calls them through a backend (`xp.rms_norm(...)`); the numpy backend *is*
these functions, and every other backend is tested against them. Numerics follow transformers' eager Llama where
it matters:

* RMSNorm normalises in the input's dtype (float32 or float64, never lower here) and multiplies by the weight
  after casting the normaliser back;
* attention scales scores after the q.k product, subtracts the row maximum before exp, and gives masked scores
  the dtype's most negative value, not -inf, so a fully masked row (a padding query) stays finite;
* exact GELU uses the correctly rounded float64 `math.erf` (numpy has no erf ufunc; scipy is not a dependency,
  and exact-GELU models are rare and small, so a vectorised wrapper is enough).

Shapes: B batch, T new tokens, S cached + new tokens, H query heads, KV key/value heads, D head_dim.
"""

from __future__ import annotations

import math

import numpy as np

from refllama.config import ActivationType

_erf = np.frompyfunc(math.erf, 1, 1)


def embedding(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows of table (V, hidden) for integer ids (B, T) -> (B, T, hidden)."""
    return table[ids]


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x (..., in) @ weight.T + bias for a float weight (out, in) as HF stores it -> (..., out). Quantized weights
    carry their own reference instead (refllama.quant: `weight.matmul(x)`)."""
    y = x @ weight.T
    return y if bias is None else y + bias


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """weight * x / sqrt(mean(x**2, -1) + eps); x (..., hidden), weight (hidden,)."""
    variance = np.mean(x * x, axis=-1, keepdims=True)  # (..., 1)
    return weight * (x * (1.0 / np.sqrt(variance + eps)).astype(x.dtype))


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE: x (B, H, T, D) * cos + rotate_half(x) * sin, with cos, sin (B, 1, T, D) from
    `rope.cos_sin`. rotate_half(x) = [-x2, x1] for the halves x1 = x[..., :D/2], x2 = x[..., D/2:]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # (B, H, T, D)
    return x * cos + rotated * sin


def apply_rope_interleaved(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE on adjacent pairs, Llama 4's complex form: (x[2i] + i x[2i+1]) * (cos + i sin) for each pair, with
    cos, sin (B, 1, T, D) holding each pair's angle twice (`rope.cos_sin` with rope_interleaved)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)  # (B, H, T, D/2, 2)
    rotated = np.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)  # (-x[2i+1], x[2i]) per pair
    return x * cos + rotated * sin


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """softmax(q k^T / sqrt(D), masked) v with grouped-query attention.

    q (B, H, T, D); k, v (B, KV, S, D), H a multiple of KV: query head h reads KV head h // (H // KV) (GQA; MQA
    when KV = 1, MHA when KV = H); mask (B, T, S) bool, True where query t may attend to slot s -> (B, H, T, D).
    """
    B, H, T, D = q.shape
    KV = k.shape[1]
    q = q.reshape(B, KV, H // KV, T, D)  # (B, KV, G, T, D): query head h = kv * G + g
    # One (B, KV, G, T, S) buffer, updated in place: the textbook expression without its three score-sized
    # temporaries, and the same arithmetic.
    scores = q @ k[:, :, None].swapaxes(-1, -2)  # (B, KV, G, T, S)
    scores *= np.asarray(D**-0.5, dtype=q.dtype)
    np.copyto(scores, np.finfo(scores.dtype).min, where=~mask[:, None, None])
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = scores @ v[:, :, None]  # (B, KV, G, T, D)
    return out.reshape(B, H, T, D)


def activation(x: np.ndarray, act: ActivationType) -> np.ndarray:
    """The MLP's activation, elementwise: silu (= swish), exact gelu, gelu with the tanh approximation, relu."""
    if act in (ActivationType.Silu, ActivationType.Swish):
        return x / (1.0 + np.exp(-x))
    if act is ActivationType.Gelu:
        return x * 0.5 * (1.0 + _erf(x * math.sqrt(0.5)).astype(x.dtype))
    if act is ActivationType.GeluTanh:
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if act is ActivationType.Relu:
        return np.maximum(x, 0)
    raise ValueError(f"activation {act} not implemented")  # pragma: no cover - ActivationType is closed


def gated_activation(gate: np.ndarray, up: np.ndarray, act: ActivationType) -> np.ndarray:
    """act(gate) * up, the SwiGLU family's elementwise step; gate, up (B, T, intermediate)."""
    return activation(gate, act) * up
