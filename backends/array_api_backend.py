"""A backend written against the Python array API standard: the template to copy for a new backend.

It runs the arithmetic of refllama/model/ops.py, operation for operation, on any namespace that follows the
standard (https://data-apis.org/array-api/), found with `array_api_compat.array_namespace`. Which namespace: the
`namespace=` argument (a module, or a module name), else the environment variable REFLLAMA_ARRAY_API naming the
module (`array_api_strict`, `numpy`, `cupy`, `torch`, `jax.numpy`, ...), else `array_api_strict`, NumPy wrapped
to reject everything the standard does not define, which is what keeps this file portable.

What a backend declares (class attributes, read by the registry, the loader, the memory estimate and the tests):

* the file name `backends/<name>_backend.py` and `BACKEND = TheClass` at its end: that is the registration;
* `name` (the same <name>), `dtypes` (the compute dtypes it runs), `extra` (the pip extra in pyproject.toml that
  installs its dependencies; an ImportError at import becomes "pip install 'refllama[<name>]'"), `marker` (a
  pytest marker, where its tests need more than an import, e.g. a GPU);
* `reads_as_stored` (stored types it reads in place, e.g. "BF16" or GGUF block names; empty: everything arrives
  as float or as a quantized weight type), `linear_kernels` (its fast paths by quantized weight type) and
  `quantized_fallback` ("reference": any other quantized type runs its own reference `matmul` on the host;
  "raise": refuse it).

And the operations the forward pass calls (backends/base.py has each one's contract): asarray, to_numpy, zeros,
cache_write, embedding, matmul (float weights), split_heads, merge_heads, rms_norm, apply_rope, attention,
gated_activation; `linear`, the dispatch between float and quantized weights, is inherited.

Where this file cannot follow ops.py to the letter, and why:

* Exact GELU needs erf, which the standard lacks: it is evaluated on the host with the correctly rounded float64
  `math.erf`, element by element, exactly as ops.py does, and rounded once to the compute dtype.
* `cache_write` assigns into the preallocated buffer where the namespace's arrays are writeable and builds a new
  buffer of the same shape with `concat` where they are not (JAX).
* The standard's arrays have no `reshape` / `transpose` methods (it has the functions `reshape` and
  `permute_dims`), so this backend overrides the two layout operations whose defaults use them, `split_heads`
  and `merge_heads`.
"""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType
from typing import Any

import array_api_compat
import ml_dtypes
import numpy as np

from refllama.backends.base import Backend
from refllama.config import ActivationType
from refllama.dtypes import DataType
from refllama.errors import BackendError

ENV = "REFLLAMA_ARRAY_API"
DEFAULT_NAMESPACE = "array_api_strict"
_ML_FLOATS = (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)
# The standard has no erf; ops.py's reasons for this vectorised float64 math.erf hold here too.
_erf = np.frompyfunc(math.erf, 1, 1)


def load_namespace(name: str) -> ModuleType:
    """The array API namespace of the module called `name` (array_api_compat wraps NumPy, CuPy, torch, ...)."""
    try:
        module = importlib.import_module(name)
        return array_api_compat.array_namespace(module.asarray(0.0))
    except (ImportError, AttributeError, TypeError) as e:
        raise BackendError(f"array API namespace {name!r} is not usable ({e}); set {ENV} to an installed module "
                           f"whose arrays follow the standard, such as {DEFAULT_NAMESPACE}") from None


class ArrayApiBackend(Backend):
    name = "array_api"
    dtypes = (DataType.F32, DataType.F64)
    extra = "array_api"
    quantized_fallback = "reference"  # no kernels: every quantized type runs its reference matmul on the host

    def __init__(self, dtype: DataType = DataType.F32, namespace: ModuleType | str | None = None):
        super().__init__(dtype)
        if namespace is None or isinstance(namespace, str):
            namespace = load_namespace(namespace or os.environ.get(ENV) or DEFAULT_NAMESPACE)
        self.xp = namespace
        self.np_dtype = dtype.numpy_dtype
        self.xp_dtype = getattr(namespace, dtype.value)  # xp.float32 or xp.float64

    # --- moving arrays ---------------------------------------------------------------------------------------

    def asarray(self, a: np.ndarray) -> Any:
        """Floating point is rounded to the compute dtype on the host, once, as the numpy backend does (bfloat16 and
        float16 are not standard dtypes); integers and bools keep their dtype."""
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating) or a.dtype.type in _ML_FLOATS:
            a = a.astype(self.np_dtype, copy=False)
        return self.xp.asarray(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.from_dlpack(a, device="cpu")  # DLPack: copies from a device, a view of host memory

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return self.xp.zeros(shape, dtype=self.xp_dtype)

    def cache_write(self, buffer: Any, values: Any, start: int) -> Any:
        end = start + values.shape[2]  # buffer (B, KV, S_max, D), values (B, KV, T, D)
        if array_api_compat.is_writeable_array(buffer):
            buffer[:, :, start:end, :] = values
            return buffer
        # Immutable arrays: the same buffer rebuilt around the new slots, (B, KV, S_max, D).
        return self.xp.concat([buffer[:, :, :start, :], values, buffer[:, :, end:, :]], axis=2)

    # --- the operations (refllama/model/ops.py, in the same order) -------------------------------------------

    def embedding(self, table: Any, ids: Any) -> Any:
        xp = self.xp
        rows = xp.take(table, xp.reshape(ids, (-1,)), axis=0)  # (B*T, hidden): `take` wants 1-d indices
        return xp.reshape(rows, (*ids.shape, table.shape[-1]))  # (B, T, hidden)

    def matmul(self, x: Any, weight: Any, bias: Any | None = None) -> Any:
        xp = self.xp
        y = xp.matmul(x, xp.matrix_transpose(weight))  # (..., in) @ (in, out) -> (..., out)
        return y if bias is None else y + bias

    def split_heads(self, x: Any, heads: int) -> Any:
        B, T, _ = x.shape
        return self.xp.permute_dims(self.xp.reshape(x, (B, T, heads, -1)), (0, 2, 1, 3))  # (B, heads, T, D)

    def merge_heads(self, x: Any) -> Any:
        B, H, T, D = x.shape
        return self.xp.reshape(self.xp.permute_dims(x, (0, 2, 1, 3)), (B, T, H * D))  # (B, T, H * D)

    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any:
        xp = self.xp
        variance = xp.mean(x * x, axis=-1, keepdims=True)  # (..., 1)
        return weight * (x * xp.astype(1.0 / xp.sqrt(variance + eps), x.dtype))

    def apply_rope(self, x: Any, cos: Any, sin: Any) -> Any:
        xp = self.xp
        half = x.shape[-1] // 2
        rotated = xp.concat([-x[..., half:], x[..., :half]], axis=-1)  # (B, H, T, D)
        return x * cos + rotated * sin

    def attention(self, q: Any, k: Any, v: Any, mask: Any) -> Any:
        xp = self.xp
        B, H, T, D = q.shape
        KV, S = k.shape[1], k.shape[2]
        q = xp.reshape(q, (B, KV, H // KV, T, D))  # (B, KV, G, T, D): query head h = kv * G + g
        scores = q @ xp.expand_dims(xp.matrix_transpose(k), axis=2)  # (B, KV, G, T, S)
        scores = scores * xp.asarray(D**-0.5, dtype=q.dtype)
        allowed = xp.reshape(mask, (B, 1, 1, T, S))
        scores = xp.where(allowed, scores, xp.asarray(xp.finfo(q.dtype).min, dtype=q.dtype))
        scores = scores - xp.max(scores, axis=-1, keepdims=True)
        scores = xp.exp(scores)
        scores = scores / xp.sum(scores, axis=-1, keepdims=True)
        out = scores @ xp.expand_dims(v, axis=2)  # (B, KV, G, T, D)
        return xp.reshape(out, (B, H, T, D))

    def gated_activation(self, gate: Any, up: Any, act: ActivationType) -> Any:
        xp, x = self.xp, gate
        if act in (ActivationType.Silu, ActivationType.Swish):
            a = x / (1.0 + xp.exp(-x))
        elif act is ActivationType.Gelu:
            erf = _erf(self.to_numpy(x * math.sqrt(0.5))).astype(self.np_dtype)  # on the host, see the docstring
            a = x * 0.5 * (1.0 + xp.asarray(erf))
        elif act is ActivationType.GeluTanh:
            a = 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
        elif act is ActivationType.Relu:
            a = xp.maximum(x, xp.zeros_like(x))
        else:  # pragma: no cover - ActivationType is closed
            raise BackendError(f"activation {act} not implemented")
        return a * up


BACKEND = ArrayApiBackend
