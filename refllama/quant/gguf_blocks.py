"""A GGUF weight kept in its stored ggml block layout, for backends whose kernels read the blocks directly.

The numpy backend dequantizes GGUF files at load (refllama/gguf_llama.py). A backend that lists block types in
`gguf_block_types` (the numba backend) gets those Linear weights and the embedding table as a `GGUFBlockWeight`
over the memory-mapped bytes instead, so a 4-bit model occupies about its file size in memory, not its float
size. Its meaning, and the reference every kernel is tested against, is `dequantize`: ggml's own dequantization
(refllama/formats/ggml_quants.py).
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
    llama.cpp permutes (refllama/gguf_llama.py).
    """

    raw: Array
    ggml_type: GGMLType
    shape: tuple[int, int]


def dequantize(weight: GGUFBlockWeight, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """The weight as a float array of `weight.shape` (ggml's float32 dequantization, then cast to `dtype`)."""
    raw = np.asarray(weight.raw).reshape(-1)
    return ggml_quants.dequantize(raw, weight.ggml_type, weight.shape).astype(dtype, copy=False)
