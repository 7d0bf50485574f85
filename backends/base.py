"""The backend interface: the handful of operations the forward pass calls.

The model (refllama/model.py) is written once against these; a backend implements them on its own arrays
and never sees a layer. Arrays also need the methods NumPy, CuPy and MLX arrays share: `reshape`,
`transpose`, `shape`, `+`, `*`, and basic slicing for reads.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from refllama.config import ActivationType
from refllama.dtypes import DataType
from refllama.weights import Linear

Array = Any


class Backend(Protocol):
    name: str
    dtype: DataType  # the compute dtype

    def asarray(self, a: np.ndarray) -> Array:
        """Host array -> backend array; floating point becomes the compute dtype, integers and bools stay."""

    def to_numpy(self, a: Array) -> np.ndarray:
        """Backend array -> NumPy array on the host."""

    def zeros(self, shape: tuple[int, ...]) -> Array:
        """A zero array of the compute dtype (KV cache buffers)."""

    def cache_write(self, buffer: Array, values: Array, start: int) -> Array:
        """Write values (B, H, T, D) into buffer (B, H, S, D) at [:, :, start:start+T]; return the buffer."""

    def embedding(self, table: Array, ids: Array) -> Array:
        """Rows of table (V, D) for integer ids (B, T) -> (B, T, D)."""

    def linear(self, x: Array, layer: Linear) -> Array:
        """x (..., in) @ layer.weight.T (+ layer.bias) -> (..., out).

        layer.weight is a float array or a refllama.quant Int8Weight / PackedIntWeight: dispatch on its type
        (docs/quantization.md); a backend that cannot run a type raises BackendError naming it.
        """

    def rms_norm(self, x: Array, weight: Array, eps: float) -> Array:
        """weight * x / sqrt(mean(x**2, -1) + eps), normalising in at least float32."""

    def apply_rope(self, x: Array, cos: Array, sin: Array) -> Array:
        """Rotate-half RoPE: x (B, H, T, D) * cos (B, 1, T, D) + rotate_half(x) * sin."""

    def attention(self, q: Array, k: Array, v: Array, mask: Array) -> Array:
        """softmax(q k^T / sqrt(D) where mask, else -inf) v with GQA.

        q (B, H, T, D); k, v (B, KV, S, D) with H a multiple of KV (query head h reads KV head
        h // (H // KV)); mask (B, T, S) bool, True where attending is allowed -> (B, H, T, D).
        """

    def gated_activation(self, gate: Array, up: Array, act: ActivationType) -> Array:
        """act(gate) * up, the SwiGLU family's elementwise step."""
