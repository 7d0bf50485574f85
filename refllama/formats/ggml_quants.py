"""GGML tensor types and their dequantization to float32 (the block formats GGUF files store).

`dequantize(raw, ggml_type, shape)` turns a tensor's raw bytes into float32, vectorised over blocks. Layouts
follow ggml's reference C (`ggml/src/ggml-quants.c`, `dequantize_row_*`); tests compare every type with the
`gguf` package's reference dequantization bit for bit.
"""

from __future__ import annotations

import enum

import numpy as np

QK_K = 256  # elements per K-quant super-block


class GGMLType(enum.IntEnum):
    """ggml's type ids as they appear in GGUF tensor infos."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    BF16 = 30


# type -> (elements per block, bytes per block)
BLOCK_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.Q8_1: (32, 4 + 4 + 32),
    GGMLType.Q2_K: (QK_K, 2 + 2 + QK_K // 16 + QK_K // 4),
    GGMLType.Q3_K: (QK_K, 2 + QK_K // 4 + QK_K // 8 + 12),
    GGMLType.Q4_K: (QK_K, 2 + 2 + QK_K // 2 + 12),
    GGMLType.Q5_K: (QK_K, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    GGMLType.Q6_K: (QK_K, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
    GGMLType.Q8_K: (QK_K, 4 + QK_K + QK_K // 8),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.BF16: (1, 2),
}


def tensor_nbytes(ggml_type: GGMLType, n_elements: int) -> int:
    """Bytes a tensor of n_elements takes; n_elements must be a whole number of blocks."""
    block, size = BLOCK_SIZES[ggml_type]
    if n_elements % block:
        raise ValueError(f"{ggml_type.name} stores blocks of {block} elements; {n_elements} is not a multiple")
    return n_elements // block * size


def dequantize(raw: np.ndarray, ggml_type: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes (uint8, exactly tensor_nbytes long) of a tensor -> float32 array of `shape`."""
    raise NotImplementedError("filled in by the dequantization work")
