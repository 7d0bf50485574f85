"""Bit packing of integer codes into int32 words: compressed-tensors, GPTQ and AWQ layouts.

The canonical layout (compressed-tensors `pack-quantized` since 0.20, `compressors/pack_quantized/helpers.py`):
each row's unsigned b-bit codes form one little-endian bit stream, code i at bits [i*b, i*b + b), read LSB first
from int32 words, padded with zero bits to a whole word. For b in {2, 4, 8} that is "32/b codes per word, code j
of a word at bits [j*b, j*b + b)"; other widths straddle words. Words are signed int32 on disk: they are
reinterpreted as uint32 before shifting.

GPTQ packs the same stream along the input dimension of a transposed [in, out] matrix (qweight [in*b/32, out]),
so qweight.T is a canonical [out, in*b/32] array with no copy. AWQ (gemm) packs along the output dimension with
the nibbles of each word holding columns in the order 0, 2, 4, 6, 1, 3, 5, 7 (`AutoAWQ awq/utils/packing_utils.py`).
"""

from __future__ import annotations

import numpy as np

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds column 8c + AWQ_ORDER[j]


def packed_words(n: int, bits: int) -> int:
    """int32 words holding n codes of `bits` bits."""
    return -(-n * bits // 32)


def unpack_rows(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """[rows, words] int32 -> [rows, n] uint8 unsigned codes (the first n codes of each row's bit stream)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of {bits} bits cannot be unpacked (1..8)")
    words = np.asarray(packed).view(np.uint32) if packed.dtype == np.int32 else np.asarray(packed, np.uint32)
    rows, nwords = words.shape
    if nwords < packed_words(n, bits):
        raise ValueError(f"{nwords} words per row cannot hold {n} codes of {bits} bits")
    mask = np.uint32((1 << bits) - 1)
    if 32 % bits == 0:  # codes never straddle a word
        per = 32 // bits
        shifts = (np.arange(per, dtype=np.uint32) * np.uint32(bits))  # (per,)
        codes = (words[:, :, None] >> shifts) & mask  # (rows, words, per)
        return codes.reshape(rows, nwords * per)[:, :n].astype(np.uint8)
    # General widths: code i starts at bit i*b of the row; read the 64-bit window of its word and the next one.
    padded = np.zeros((rows, nwords + 1), dtype=np.uint64)
    padded[:, :nwords] = words
    start = np.arange(n, dtype=np.int64) * bits  # (n,)
    word, offset = start // 32, (start % 32).astype(np.uint64)
    window = padded[:, word] | (padded[:, word + 1] << np.uint64(32))  # (rows, n)
    return ((window >> offset) & np.uint64(mask)).astype(np.uint8)


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """[rows, n] unsigned codes (< 2**bits) -> [rows, ceil(n*bits/32)] int32, the inverse of unpack_rows."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of {bits} bits cannot be packed (1..8)")
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack into {bits} bits")
    rows, n = codes.shape
    nwords = packed_words(n, bits)
    blocks = -(-n // 32)  # 32 codes fill exactly `bits` words
    padded = np.zeros((rows, blocks * 32), dtype=np.uint64)
    padded[:, :n] = codes
    padded = padded.reshape(rows, blocks, 32)
    out = np.zeros((rows, blocks, bits + 1), dtype=np.uint64)  # one spare word for the last straddler
    for j in range(32):  # codes occupy disjoint bits, so or-ing them in is exact
        word, offset = divmod(j * bits, 32)
        out[:, :, word] |= padded[:, :, j] << np.uint64(offset)
    low = out[:, :, :bits] & np.uint64(0xFFFFFFFF)
    low[:, :, 1:] |= out[:, :, :bits - 1] >> np.uint64(32)  # bits that spilled past a word go to the next
    return low.reshape(rows, blocks * bits)[:, :nwords].astype(np.uint32).view(np.int32)


def unpack_awq(qweight: np.ndarray, bits: int = 4) -> np.ndarray:
    """AWQ gemm [rows, cols/8] int32 packed along the columns in AWQ_ORDER -> [rows, cols] uint8 codes."""
    if bits != 4:
        raise ValueError("the AWQ gemm layout is 4-bit")
    nibbles = unpack_rows(qweight, 4, qweight.shape[1] * 8).reshape(qweight.shape[0], -1, 8)  # (rows, words, 8)
    out = np.empty_like(nibbles)
    out[:, :, list(AWQ_ORDER)] = nibbles  # nibble j -> column AWQ_ORDER[j]
    return out.reshape(qweight.shape[0], -1)


def pack_awq(codes: np.ndarray) -> np.ndarray:
    """[rows, cols] 4-bit codes -> AWQ gemm [rows, cols/8] int32 (for tests and round trips)."""
    rows, cols = codes.shape
    grouped = np.asarray(codes).reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]  # nibble j <- column ORDER[j]
    return pack_rows(grouped.reshape(rows, cols), 4)
