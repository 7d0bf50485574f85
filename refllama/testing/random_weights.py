"""Random quantized weights in the layouts the loaders build, as inputs for backend tests.

Scales are bfloat16 by default, as compressed-tensors, GPTQ and AWQ checkpoints store them: every bfloat16 value is
exact in float16, float32 and float64, so the weight means the same matrix in every compute dtype.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from refllama.formats import ggml_quants
from refllama.formats.ggml_quants import GGMLType
from refllama.quant.gguf_blocks import GGUFBlockWeight
from refllama.quant.packing import pack_rows
from refllama.quant.types import ActivationQuant, Int8Weight, PackedIntWeight

BF16 = np.dtype(ml_dtypes.bfloat16)


def _groups(K: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-K // group_size)  # the last group may be partial


def _scale(rng: np.random.Generator, shape: tuple[int, int], dtype: np.dtype | type) -> np.ndarray:
    return (rng.uniform(0.5, 2, shape) * 2.0 ** rng.integers(-8, -4, shape)).astype(dtype)


def _act_order(rng: np.random.Generator, K: int, group_size: int | None) -> np.ndarray:
    """GPTQ act-order: each column's group, in a shuffled (non-monotonic) order."""
    if group_size is None:
        raise ValueError("act-order needs a group size")
    return rng.permutation(np.arange(K) // group_size).astype(np.int32)


def int8_weight(rng: np.random.Generator, N: int, K: int, *, group_size: int | None = None, asym: bool = False,
                act_order: bool = False, per_tensor: bool = False, semantics: str | None = None,
                scale_dtype: np.dtype | type = BF16) -> Int8Weight:
    """Int8 codes [N, K]: weight-only (zero points in int8 when `asym`), or W8A8 with `semantics` ("hf" /
    "vllm": one scale per output channel, or per tensor)."""
    q = rng.integers(-128, 128, (N, K), dtype=np.int8)
    scale = _scale(rng, (1, 1) if per_tensor else (N, _groups(K, group_size)), scale_dtype)
    zero = rng.integers(-20, 20, scale.shape, dtype=np.int8) if asym else None
    g_idx = _act_order(rng, K, group_size) if act_order else None
    activation = None if semantics is None else ActivationQuant(semantics)
    return Int8Weight(q, scale, zero, group_size, g_idx, activation)


def packed_weight(rng: np.random.Generator, N: int, K: int, bits: int, *, group_size: int | None = None,
                  asym: bool = False, act_order: bool = False, per_tensor: bool = False, transposed: bool = False,
                  scale_dtype: np.dtype | type = BF16) -> PackedIntWeight:
    """Unsigned `bits`-bit codes [N, K] packed into int32 words; `transposed`: the words as a strided view, as
    GPTQ's qweight.T arrives."""
    packed = pack_rows(rng.integers(0, 1 << bits, (N, K), dtype=np.uint8), bits)  # (N, words)
    if transposed:
        packed = np.ascontiguousarray(packed.T).T
    scale = _scale(rng, (1, 1) if per_tensor else (N, _groups(K, group_size)), scale_dtype)
    zero = rng.integers(0, 1 << bits, scale.shape).astype(np.int32) if asym else None
    g_idx = _act_order(rng, K, group_size) if act_order else None
    return PackedIntWeight(packed, scale, bits, K, zero, group_size, g_idx)


def gguf_weight(rng: np.random.Generator, ggml_type: GGMLType | str, N: int, K: int) -> GGUFBlockWeight:
    """Random ggml blocks [N, K]: random bytes for the codes and sub-block scales, finite float scales and mins of
    a realistic size (|d| ~ 0.02) for the fields ggml stores as fp16 / fp32."""
    ggml_type = GGMLType[ggml_type] if isinstance(ggml_type, str) else GGMLType(ggml_type)
    layout = ggml_quants.block_layout(ggml_type)
    if layout is None:
        raise ValueError(f"{ggml_type.name} is not a block type")
    block = ggml_quants.BLOCK_SIZES[ggml_type][0]
    if K % block:
        raise ValueError(f"{ggml_type.name} rows are whole blocks of {block}; K = {K} is not")
    blocks = rng.integers(0, 256, (N * K // block, layout.itemsize), dtype=np.uint8).view(layout).reshape(-1)
    for name in layout.names:
        if layout[name].kind == "f":
            blocks[name] = (rng.standard_normal(blocks[name].shape) * 0.02).astype(layout[name])
    return GGUFBlockWeight(blocks.view(np.uint8).reshape(N, -1), ggml_type, (N, K))
