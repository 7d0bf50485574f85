"""The reference backend: plain NumPy in float32 or float64, no tricks. Every other backend is tested against it.

Its operations are the functions of refllama/model/ops.py, and its quantized Linears are each weight type's own
reference `matmul` (refllama/quant), so this file only moves arrays in and out.
"""

from __future__ import annotations

import numpy as np

from refllama.backends.base import Backend
from refllama.dtypes import DataType, is_ml_float
from refllama.model import ops


class NumpyBackend(Backend):
    name = "numpy"
    dtypes = (DataType.F32, DataType.F64)
    quantized_fallback = "reference"  # every quantized type runs its reference matmul, here, by definition

    def __init__(self, dtype: DataType = DataType.F32):
        super().__init__(dtype)
        self.np_dtype = dtype.numpy_dtype

    def asarray(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating) or is_ml_float(a.dtype):
            return a.astype(self.np_dtype, copy=False)
        return a

    def to_numpy(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a)

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=self.np_dtype)

    def cache_write(self, buffer: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
        buffer[:, :, start:start + values.shape[2]] = values
        return buffer

    embedding = staticmethod(ops.embedding)
    matmul = staticmethod(ops.linear)
    rms_norm = staticmethod(ops.rms_norm)
    apply_rope = staticmethod(ops.apply_rope)
    apply_rope_interleaved = staticmethod(ops.apply_rope_interleaved)
    attention = staticmethod(ops.attention)
    gated_activation = staticmethod(ops.gated_activation)


BACKEND = NumpyBackend
