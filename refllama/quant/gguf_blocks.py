"""A GGUF weight kept in its stored ggml block layout, for backends whose kernels read the blocks directly.

The numpy backend dequantizes GGUF files at load (refllama/formats/gguf_llama.py). A backend that lists block types in
`reads_as_stored` (numba, cupy) gets those Linear weights and the embedding table as a `GGUFBlockWeight` over the
memory-mapped bytes instead, so a 4-bit model occupies about its file size in memory, not its float size. Its
meaning, and the reference every kernel is tested against, is `dequantize`: ggml's own dequantization
(refllama/formats/ggml_quants.py); `matmul` and `rows` are the reference Linear and embedding lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from refllama.formats import ggml_quants
from refllama.formats.ggml_quants import GGMLType

Array = Any  # numpy here; a backend's own array type after WeightMap.map


@dataclass(frozen=True, eq=False)
class GGUFBlockWeight:
    """A 2-D ggml tensor as stored: `raw` uint8 [rows, bytes per row], each row `shape[1] / block` whole blocks.

    Rows are the HF [out, in] weight's rows: a view of the mapped file, or a reordered copy for q/k, whose rows
    llama.cpp permutes (refllama/formats/gguf_llama.py).
    """

    raw: Array
    ggml_type: GGMLType
    shape: tuple[int, int]

    def dequantize(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        return dequantize(self, dtype)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x (..., in) @ W.T -> (..., out): the blocks dequantized (ggml's float32), then a matmul in x's dtype."""
        return x @ dequantize(self, x.dtype).T

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Embedding lookup: the rows for integer ids (...) dequantized -> (..., in), float32 (only those rows)."""
        ids = np.asarray(ids)
        picked = np.asarray(self.raw)[ids.reshape(-1)]  # (n, bytes per row): whole blocks per row
        flat = ggml_quants.dequantize(picked.reshape(-1), self.ggml_type, (ids.size, self.shape[1]))
        return flat.astype(np.float32, copy=False).reshape(*ids.shape, self.shape[1])


def dequantize(weight: GGUFBlockWeight, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """The weight as a float array of `weight.shape` (ggml's float32 dequantization, then cast to `dtype`)."""
    raw = np.asarray(weight.raw).reshape(-1)
    return ggml_quants.dequantize(raw, weight.ggml_type, weight.shape).astype(dtype, copy=False)
