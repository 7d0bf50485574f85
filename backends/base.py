"""The backend interface: what a backend declares, and the handful of operations the forward pass calls.

The model (refllama/model/llama.py) is written once against these; a backend implements them on its own arrays
and never sees a layer. Their reference arithmetic is refllama/model/ops.py (the numpy backend is those
functions). Arrays also need what the Python array API standard gives every array: `shape`, `+`, and slicing that
names every axis; the two layout changes the model makes (`split_heads`, `merge_heads`) are operations here,
written with the `reshape` and `transpose` methods NumPy, CuPy and MLX arrays share, for a backend to override
where its arrays lack them (backends/array_api_backend.py).

A backend is a subclass of `Backend` in `backends/<name>_backend.py` whose module sets `BACKEND = TheClass`; the
registry (`refllama.backends`) finds it by that file name and imports it only when asked for.

Quantized weights (refllama.quant: Int8Weight, PackedIntWeight, GGUFBlockWeight) carry their own reference
`matmul`. A backend implements `matmul` for float weights only and lists the quantized types it accelerates in
`linear_kernels`; for any other type, `Backend.linear` runs the weight's reference on the host when
`quantized_fallback` is "reference", or raises BackendError naming the type when it is "raise".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from typing import Any, ClassVar, Literal

import numpy as np

from refllama.config import ActivationType
from refllama.dtypes import DataType
from refllama.errors import BackendError
from refllama.model import ops
from refllama.model.weights import Linear
from refllama.quant.gguf_blocks import GGUFBlockWeight
from refllama.quant.types import Int8Weight, PackedIntWeight

Array = Any
QUANTIZED_WEIGHTS = (Int8Weight, PackedIntWeight, GGUFBlockWeight)
# (backend, x (..., in), quantized weight, bias (out,) or None) -> x @ W.T + bias (..., out)
LinearKernel = Callable[[Any, Array, Any, Any], Array]


class Backend:
    # --- what the backend declares (class attributes, read by the engine, the memory estimate and the tests) ---
    name: ClassVar[str]
    dtypes: ClassVar[tuple[DataType, ...]]  # compute dtypes it runs
    extra: ClassVar[str | None] = None  # the pip extra that installs its dependencies: pip install -e ".[extra]"
    marker: ClassVar[str | None] = None  # pytest marker its tests carry where more than an import is needed
    # Stored types it reads in place, without a float copy: "BF16" (2-D bfloat16 matrices) and ggml block type
    # names ("Q4_0", ...). The loader keeps those GGUF blocks memory-mapped as GGUFBlockWeight; the memory
    # estimate counts them at their stored size.
    reads_as_stored: ClassVar[frozenset[str]] = frozenset()
    # Fast paths by quantized weight type; `quantized_fallback` says what happens to the other types.
    linear_kernels: ClassVar[dict[type, LinearKernel]] = {}
    quantized_fallback: ClassVar[Literal["reference", "raise"]] = "reference"

    dtype: DataType  # the compute dtype of this instance

    def __init__(self, dtype: DataType = DataType.F32):
        if dtype not in self.dtypes:
            raise BackendError(f"the {self.name} backend computes in {', '.join(d.value for d in self.dtypes)}, "
                               f"not {dtype.value}")
        self.dtype = dtype

    # --- the operations ---------------------------------------------------------------------------------------

    def asarray(self, a: np.ndarray) -> Array:
        """Host array -> backend array; floating point becomes the compute dtype, integers and bools stay."""
        raise NotImplementedError

    def take_weight(self, a: np.ndarray) -> Array:
        """A weight tensor at load -> backend array, once per tensor (the loader's `take_weights`): `asarray`,
        unless the backend keeps weights somewhere of their own (the numba backend: huge pages)."""
        return self.asarray(a)

    def to_numpy(self, a: Array) -> np.ndarray:
        """Backend array -> NumPy array on the host."""
        raise NotImplementedError

    def zeros(self, shape: tuple[int, ...]) -> Array:
        """A zero array of the compute dtype (KV cache buffers)."""
        raise NotImplementedError

    def cache_write(self, buffer: Array, values: Array, start: int) -> Array:
        """Write values (B, H, T, D) into buffer (B, H, S, D) at [:, :, start:start+T]; return the buffer."""
        raise NotImplementedError

    def embedding(self, table: Array, ids: Array) -> Array:
        """Rows of table (V, D) for integer ids (B, T) -> (B, T, D)."""
        raise NotImplementedError

    def matmul(self, x: Array, weight: Array, bias: Array | None = None) -> Array:
        """x (..., in) @ weight.T + bias -> (..., out) for a float weight (out, in) in this backend's arrays."""
        raise NotImplementedError

    def linear(self, x: Array, layer: Linear) -> Array:
        """x (..., in) @ layer.weight.T (+ layer.bias) -> (..., out), for a float or a quantized weight."""
        w, bias = layer.weight, layer.bias
        kernel = self.linear_kernels.get(type(w))
        if kernel is not None:
            return kernel(self, x, w, bias)
        if not isinstance(w, QUANTIZED_WEIGHTS):
            if hasattr(w, "dtype") and hasattr(w, "shape"):  # a float array of this backend
                return self.matmul(x, w, bias)
        elif self.quantized_fallback == "reference":
            y = self.asarray(self._on_host(w).matmul(self.to_numpy(x)))  # the weight's own reference, on the host
            return y if bias is None else y + bias
        names = ", ".join(t.__name__ for t in self.linear_kernels) or "none"
        raise BackendError(f"the {self.name} backend cannot run a Linear whose weight is a {type(w).__name__} "
                           f"(it runs float arrays and these quantized types: {names})")

    def linears(self, x: Array, layers: Sequence[Linear]) -> list[Array]:
        """[linear(x, layer) for layer in layers]: the Linears that read one input (q/k/v, gate/up). A backend may
        run them together, reading x once and starting its threads once; this default runs them one by one."""
        return [self.linear(x, layer) for layer in layers]

    def split_heads(self, x: Array, heads: int) -> Array:
        """(B, T, heads * D) -> (B, heads, T, D)."""
        B, T, _ = x.shape
        return x.reshape(B, T, heads, -1).transpose(0, 2, 1, 3)

    def merge_heads(self, x: Array) -> Array:
        """(B, H, T, D) -> (B, T, H * D), the inverse of split_heads."""
        B, H, T, D = x.shape
        return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)

    def _on_host(self, w: Any) -> Any:
        """A quantized weight whose arrays are NumPy's: the engine took every tensor into this backend's arrays,
        the reference runs on the host (views for NumPy itself; a copy per call from a device)."""
        arrays = {f.name: self.to_numpy(v) for f in fields(w) if not isinstance(v := getattr(w, f.name), np.ndarray)
                  and hasattr(v, "shape") and hasattr(v, "dtype")}
        return replace(w, **arrays) if arrays else w

    def rms_norm(self, x: Array, weight: Array, eps: float) -> Array:
        """weight * x / sqrt(mean(x**2, -1) + eps), normalising in at least float32."""
        raise NotImplementedError

    def apply_rope(self, x: Array, cos: Array, sin: Array) -> Array:
        """Rotate-half RoPE: x (B, H, T, D) * cos (B, 1, T, D) + rotate_half(x) * sin."""
        raise NotImplementedError

    def apply_rope_interleaved(self, x: Array, cos: Array, sin: Array) -> Array:
        """RoPE on adjacent pairs (Llama 4): the reference (refllama/model/ops.py) on the host, unless a backend
        has its own."""
        host = ops.apply_rope_interleaved(self.to_numpy(x), self.to_numpy(cos), self.to_numpy(sin))
        return self.asarray(host)

    def attention(self, q: Array, k: Array, v: Array, mask: Array) -> Array:
        """softmax(q k^T / sqrt(D) where mask, else the dtype's minimum) v with GQA.

        q (B, H, T, D); k, v (B, KV, S, D) with H a multiple of KV (query head h reads KV head h // (H // KV));
        mask (B, T, S) bool, True where attending is allowed -> (B, H, T, D).
        """
        raise NotImplementedError

    def gated_activation(self, gate: Array, up: Array, act: ActivationType) -> Array:
        """act(gate) * up, the SwiGLU family's elementwise step."""
        raise NotImplementedError
