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
cache_write, embedding, matmul (float weights), rms_norm, apply_rope, attention, gated_activation; `linear`,
the dispatch between float and quantized weights, is inherited.

Where this file cannot follow ops.py to the letter, and why:

* Exact GELU needs erf, which the standard lacks: it is evaluated on the host with the correctly rounded float64
  `math.erf`, element by element, exactly as ops.py does, and rounded once to the compute dtype.
* `cache_write` assigns into the preallocated buffer where the namespace's arrays are writeable and builds a new
  buffer of the same shape with `concat` where they are not (JAX).
* Quantized weights have no kernel here: their arrays arrive as this backend's (the engine converts every tensor),
  so `linear` brings them back to NumPy before the base class runs their reference `matmul` on the host.
* The model (refllama/model/llama.py, kv_cache.py) calls `.reshape` and `.transpose` on arrays and indexes them
  with fewer keys than axes; the standard has `reshape` and `permute_dims` as functions only and requires an
  index to name every axis or hold an ellipsis. `ModelArray`, at the end of this file, supplies exactly that and
  nothing more, so the operations above see only standard arrays.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import fields, replace
from types import ModuleType
from typing import Any

import array_api_compat
import ml_dtypes
import numpy as np

from refllama.backends.base import QUANTIZED_WEIGHTS, Backend
from refllama.config import ActivationType
from refllama.dtypes import DataType
from refllama.errors import BackendError
from refllama.model.weights import Linear

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

    def asarray(self, a: np.ndarray) -> ModelArray:
        """Floating point is rounded to the compute dtype on the host, once, as the numpy backend does (bfloat16 and
        float16 are not standard dtypes); integers and bools keep their dtype."""
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating) or a.dtype.type in _ML_FLOATS:
            a = a.astype(self.np_dtype, copy=False)
        return self._wrap(self.xp.asarray(a))

    def to_numpy(self, a: ModelArray) -> np.ndarray:
        return np.from_dlpack(_data(a), device="cpu")  # DLPack: copies from a device, a view of host memory

    def zeros(self, shape: tuple[int, ...]) -> ModelArray:
        return self._wrap(self.xp.zeros(shape, dtype=self.xp_dtype))

    def cache_write(self, buffer: ModelArray, values: ModelArray, start: int) -> ModelArray:
        buf, new = _data(buffer), _data(values)  # (B, KV, S_max, D), (B, KV, T, D)
        end = start + new.shape[2]
        if array_api_compat.is_writeable_array(buf):
            buf[:, :, start:end, :] = new
            return buffer
        # Immutable arrays: the same buffer rebuilt around the new slots, (B, KV, S_max, D).
        return self._wrap(self.xp.concat([buf[:, :, :start, :], new, buf[:, :, end:, :]], axis=2))

    # --- the operations (refllama/model/ops.py, in the same order) -------------------------------------------

    def embedding(self, table: ModelArray, ids: ModelArray) -> ModelArray:
        xp, table, ids = self.xp, _data(table), _data(ids)
        rows = xp.take(table, xp.reshape(ids, (-1,)), axis=0)  # (B*T, hidden): `take` wants 1-d indices
        return self._wrap(xp.reshape(rows, (*ids.shape, table.shape[-1])))  # (B, T, hidden)

    def matmul(self, x: ModelArray, weight: ModelArray, bias: ModelArray | None = None) -> ModelArray:
        xp = self.xp
        y = xp.matmul(_data(x), xp.matrix_transpose(_data(weight)))  # (..., in) @ (in, out) -> (..., out)
        return self._wrap(y if bias is None else y + _data(bias))

    def linear(self, x: ModelArray, layer: Linear) -> ModelArray:
        """The base class's dispatch, with a quantized weight's arrays brought back to the host for its reference
        (views for a host namespace such as array_api_strict; a copy per call from a device)."""
        w = layer.weight
        if isinstance(w, QUANTIZED_WEIGHTS):
            host = {f.name: self.to_numpy(v) for f in fields(w) if isinstance(v := getattr(w, f.name), ModelArray)}
            layer = replace(layer, weight=replace(w, **host))
        return super().linear(x, layer)

    def rms_norm(self, x: ModelArray, weight: ModelArray, eps: float) -> ModelArray:
        xp, x = self.xp, _data(x)
        variance = xp.mean(x * x, axis=-1, keepdims=True)  # (..., 1)
        return self._wrap(_data(weight) * (x * xp.astype(1.0 / xp.sqrt(variance + eps), x.dtype)))

    def apply_rope(self, x: ModelArray, cos: ModelArray, sin: ModelArray) -> ModelArray:
        xp, x = self.xp, _data(x)
        half = x.shape[-1] // 2
        rotated = xp.concat([-x[..., half:], x[..., :half]], axis=-1)  # (B, H, T, D)
        return self._wrap(x * _data(cos) + rotated * _data(sin))

    def attention(self, q: ModelArray, k: ModelArray, v: ModelArray, mask: ModelArray) -> ModelArray:
        xp, q, k, v, mask = self.xp, _data(q), _data(k), _data(v), _data(mask)
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
        return self._wrap(xp.reshape(out, (B, H, T, D)))

    def gated_activation(self, gate: ModelArray, up: ModelArray, act: ActivationType) -> ModelArray:
        xp, x = self.xp, _data(gate)
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
        return self._wrap(a * _data(up))

    def _wrap(self, a: Any) -> ModelArray:
        return ModelArray(a, self.xp)


# --- what the model asks of arrays beyond the standard -------------------------------------------------------


class ModelArray:
    """A standard array with the few methods refllama/model/llama.py and kv_cache.py call on backend arrays.

    `reshape(*shape)` and `transpose(*axes)` as NumPy spells them (the standard: `xp.reshape`, `xp.permute_dims`),
    indexing with fewer keys than axes (completed with an ellipsis, which the standard requires), `+` and `*`.
    Every operation above unwraps its inputs (`_data`), so a backend on a namespace whose arrays already have these
    (NumPy, CuPy, MLX) needs none of this.
    """

    __slots__ = ("data", "xp")

    def __init__(self, data: Any, xp: ModuleType):
        self.data, self.xp = data, xp

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    def reshape(self, *shape: int) -> ModelArray:
        return ModelArray(self.xp.reshape(self.data, shape), self.xp)

    def transpose(self, *axes: int) -> ModelArray:
        return ModelArray(self.xp.permute_dims(self.data, axes), self.xp)

    def __getitem__(self, key: Any) -> ModelArray:
        key = key if isinstance(key, tuple) else (key,)
        if not any(k is Ellipsis for k in key) and sum(k is not None for k in key) < self.data.ndim:
            key = (*key, Ellipsis)
        return ModelArray(self.data[key], self.xp)

    def __add__(self, other: Any) -> ModelArray:
        return ModelArray(self.data + _data(other), self.xp)

    def __mul__(self, other: Any) -> ModelArray:
        return ModelArray(self.data * _data(other), self.xp)

    __radd__, __rmul__ = __add__, __mul__

    def __repr__(self) -> str:
        return f"ModelArray({self.data!r})"


def _data(a: Any) -> Any:
    """The standard array inside a ModelArray (anything else passes through)."""
    return a.data if isinstance(a, ModelArray) else a


BACKEND = ArrayApiBackend
