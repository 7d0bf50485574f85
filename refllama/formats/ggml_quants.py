"""GGML tensor types and their dequantization to float32 (the block formats GGUF files store).

`dequantize(raw, ggml_type, shape)` turns a tensor's raw bytes into float32, vectorised over blocks. Layouts
follow ggml's reference C (`ggml/src/ggml-quants.c`, `dequantize_row_*`); tests compare every type with the
`gguf` package's reference dequantization bit for bit.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any

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


# ---------------------------------------------------------------------------------------------------------
# Block decoders. Each format is a packed little-endian struct (a NumPy structured dtype, so fields are read
# straight out of the bytes) and a function filling `out` (n_blocks, elements per block) from an array of
# such blocks. Arithmetic follows ggml's reference C exactly: fp16 scales are widened to float32 first, the
# per-sub-block factor (d * scale) is formed once, then out = factor * q, then a min is added or subtracted:
# separate float32 roundings (no fused multiply-add), as in the gguf package.
# ---------------------------------------------------------------------------------------------------------

_Decoder = Callable[[np.ndarray, np.ndarray], None]
_DECODERS: dict[GGMLType, tuple[np.dtype, _Decoder]] = {}
_CHUNK_ELEMENTS = 1 << 20  # blocks are decoded in chunks of about this many elements to bound temporaries


def _decoder(ggml_type: GGMLType, *fields: tuple[Any, ...]) -> Callable[[_Decoder], _Decoder]:
    def register(fn: _Decoder) -> _Decoder:
        layout = np.dtype(list(fields))
        assert layout.itemsize == BLOCK_SIZES[ggml_type][1], ggml_type
        _DECODERS[ggml_type] = (layout, fn)
        return fn

    return register


def _bits(x: np.ndarray, width: int) -> np.ndarray:
    """Unpack each byte into fields of `width` bits, lowest first: uint8 (..., m) -> (..., 8 // width, m)."""
    shifts = np.arange(0, 8, width, dtype=np.uint8)[:, None]
    return (x[..., None, :] >> shifts) & np.uint8((1 << width) - 1)


def _f32(field: np.ndarray) -> np.ndarray:
    """A per-block scalar field (fp16 or fp32) as a float32 column, ready to broadcast over the block."""
    return field.astype(np.float32)[:, None]


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4).

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; bytes 8-11 hold the low 4 bits of
    scales 4-7 (low nibble) and mins 4-7 (high nibble), whose top 2 bits are the spare top bits of bytes 0-7.
    """
    a, b, c = (scales[:, 4 * i : 4 * i + 4] for i in range(3))
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 2) & 0x30)], axis=1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 2) & 0x30)], axis=1)
    return sc, mn


@_decoder(GGMLType.Q8_0, ("d", "<f2"), ("qs", "i1", 32))
def _q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    # fp16 d, 32 int8 quants: x = d * q.
    np.multiply(_f32(blocks["d"]), blocks["qs"], out=out)


@_decoder(GGMLType.Q8_K, ("d", "<f4"), ("qs", "i1", QK_K), ("bsums", "<i2", QK_K // 16))
def _q8_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # fp32 d, 256 int8 quants, 16 int16 group sums (only used by dot products): x = d * q.
    np.multiply(_f32(blocks["d"]), blocks["qs"], out=out)


@_decoder(GGMLType.Q4_0, ("d", "<f2"), ("qs", "u1", 16))
def _q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    # fp16 d, 16 bytes: element j is the low nibble of byte j, element j + 16 the high nibble; x = d * (q - 8).
    q = _bits(blocks["qs"], 4).reshape(out.shape).view(np.int8) - np.int8(8)
    np.multiply(_f32(blocks["d"]), q, out=out)


@_decoder(GGMLType.Q4_1, ("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16))
def _q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    # fp16 d, fp16 m, nibbles as in Q4_0: x = d * q + m.
    np.multiply(_f32(blocks["d"]), _bits(blocks["qs"], 4).reshape(out.shape), out=out)
    out += _f32(blocks["m"])


def _q5(blocks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """5-bit quants 0..31: the nibbles as in Q4_0, plus bit j of the little-endian u32 `qh` as bit 4 of element j."""
    high = np.unpackbits(blocks["qh"], axis=1, bitorder="little")
    return _bits(blocks["qs"], 4).reshape(shape) | (high << np.uint8(4))


@_decoder(GGMLType.Q5_0, ("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16))
def _q5_0(blocks: np.ndarray, out: np.ndarray) -> None:
    # fp16 d, 4 bytes of high bits, 16 bytes of nibbles: x = d * (q - 16).
    np.multiply(_f32(blocks["d"]), _q5(blocks, out.shape).view(np.int8) - np.int8(16), out=out)


@_decoder(GGMLType.Q5_1, ("d", "<f2"), ("m", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16))
def _q5_1(blocks: np.ndarray, out: np.ndarray) -> None:
    # fp16 d, fp16 m, 4 bytes of high bits, 16 bytes of nibbles: x = d * q + m.
    np.multiply(_f32(blocks["d"]), _q5(blocks, out.shape), out=out)
    out += _f32(blocks["m"])


@_decoder(GGMLType.Q2_K, ("scales", "u1", 16), ("qs", "u1", 64), ("d", "<f2"), ("dmin", "<f2"))
def _q2_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # 16 sub-blocks of 16. Byte i of `scales`: low nibble scales sub-block i, high nibble is its min. Each
    # 128-element half takes 32 bytes of `qs`; 2-bit field k (bits 2k..2k+1) of byte l is element 32k + l.
    # x = (d * scale) * q - (dmin * min).
    n = len(blocks)
    scales = blocks["scales"]
    q = _bits(blocks["qs"].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    out = out.reshape(n, 16, 16)
    np.multiply((_f32(blocks["d"]) * (scales & 15))[..., None], q, out=out)
    out -= (_f32(blocks["dmin"]) * (scales >> 4))[..., None]


@_decoder(GGMLType.Q3_K, ("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", "<f2"))
def _q3_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # 16 sub-blocks of 16 with signed 6-bit scales (stored + 32): bytes 0-7 hold the low 4 bits of scales 0-7
    # (low nibbles) and 8-15 (high nibbles); bytes 8-11 hold the top 2 bits, scale 4k + j in bits 2k..2k+1 of
    # byte 8 + j. Low 2 bits of each quant as in Q2_K; bit k of hmask byte l is the high bit of element 32k + l,
    # and a CLEAR high bit means "subtract 4": q = low + 4 * high - 4 in -4..3. x = (d * scale) * q.
    n = len(blocks)
    raw = blocks["scales"]
    scales = _bits(raw[:, :8], 4).reshape(n, 16) | (_bits(raw[:, 8:], 2).reshape(n, 16) << np.uint8(4))
    low = _bits(blocks["qs"].reshape(n, 2, 32), 2).reshape(n, 8, 32)
    q = (low | (_bits(blocks["hmask"], 1) << np.uint8(2))).view(np.int8) - np.int8(4)
    dl = _f32(blocks["d"]) * (scales.view(np.int8) - np.int8(32))
    np.multiply(dl[..., None], q.reshape(n, 16, 16), out=out.reshape(n, 16, 16))


def _kquant_scale_min(blocks: np.ndarray, q: np.ndarray, out: np.ndarray) -> None:
    """Q4_K/Q5_K's out = (d * scale) * q - (dmin * min), per sub-block of 32."""
    sc, mn = _scale_min_k4(blocks["scales"])
    np.multiply((_f32(blocks["d"]) * sc)[..., None], q, out=out)
    out -= (_f32(blocks["dmin"]) * mn)[..., None]


@_decoder(GGMLType.Q4_K, ("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128))
def _q4_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # 8 sub-blocks of 32 with 6-bit scales and mins (see _scale_min_k4). Each 64 elements take 32 bytes of
    # `qs`: low nibbles are the first sub-block, high nibbles the second. x = (d * scale) * q - (dmin * min).
    n = len(blocks)
    q = _bits(blocks["qs"].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    _kquant_scale_min(blocks, q, out.reshape(n, 8, 32))


@_decoder(GGMLType.Q5_K, ("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32),
          ("qs", "u1", 128))
def _q5_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # Q4_K plus a fifth bit: bit k of qh byte l is bit 4 of element 32k + l (sub-block k).
    n = len(blocks)
    q = _bits(blocks["qs"].reshape(n, 4, 32), 4).reshape(n, 8, 32) | (_bits(blocks["qh"], 1) << np.uint8(4))
    _kquant_scale_min(blocks, q, out.reshape(n, 8, 32))


@_decoder(GGMLType.Q6_K, ("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2"))
def _q6_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # 16 sub-blocks of 16 with int8 scales. Per 128-element half: 64 bytes of `ql` (bytes 0-31 low nibbles are
    # elements 0-31, bytes 32-63 low nibbles 32-63, then the high nibbles 64-95 and 96-127) and 32 bytes of
    # `qh` (bits 2k..2k+1 of byte l are the top 2 bits of element 32k + l). x = (d * scale) * (q - 32).
    n = len(blocks)
    low = _bits(blocks["ql"].reshape(n, 2, 64), 4).reshape(n, 2, 4, 32)
    high = _bits(blocks["qh"].reshape(n, 2, 32), 2)
    q = (low | (high << np.uint8(4))).view(np.int8) - np.int8(32)
    dl = _f32(blocks["d"]) * blocks["scales"]
    np.multiply(dl[..., None], q.reshape(n, 16, 16), out=out.reshape(n, 16, 16))


# Unquantized float types: little-endian element dtypes, converted exactly (F64 rounds to nearest float32).
_FLOATS = {GGMLType.F32: "<f4", GGMLType.F16: "<f2", GGMLType.F64: "<f8"}

# Every type a tensor may have here: the float types, the integer types (read as they are) and each block type
# with a decoder above. Q8_1 (llama.cpp's format for activations, never for weights) has none.
SUPPORTED_TYPES = tuple(sorted({*_FLOATS, GGMLType.BF16, GGMLType.I8, GGMLType.I16, GGMLType.I32, GGMLType.I64,
                                *_DECODERS}))


def block_layout(ggml_type: GGMLType) -> np.dtype | None:
    """One block of a block type as a NumPy structured dtype (ggml's field names, e.g. "d", "qs"; the float fields
    are the scales), None for plain types (F32, BF16, ...)."""
    entry = _DECODERS.get(ggml_type)
    return entry[0] if entry is not None else None


def dequantize(raw: np.ndarray, ggml_type: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes (uint8, exactly tensor_nbytes long) of a tensor -> new float32 array of `shape`.

    Blocks run along the flattened (row-major) element order. Float types are converted (F32 copied);
    Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K..Q6_K and Q8_K are decoded as ggml does.
    """
    ggml_type = GGMLType(ggml_type)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"invalid shape {shape}")
    if ggml_type not in _FLOATS and ggml_type not in _DECODERS and ggml_type != GGMLType.BF16:
        raise ValueError(f"cannot dequantize {ggml_type.name}")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"raw must be a 1-D uint8 array, got {raw.dtype} with shape {raw.shape}")
    n_elements = math.prod(shape)
    nbytes = tensor_nbytes(ggml_type, n_elements)  # raises if n_elements is not a whole number of blocks
    if raw.size != nbytes:
        raise ValueError(f"{ggml_type.name} tensor of shape {shape} takes {nbytes} bytes, got {raw.size}")
    raw = np.ascontiguousarray(raw)  # no copy for the usual (memory-map) case; view() needs contiguity

    if ggml_type in _FLOATS:
        return raw.view(_FLOATS[ggml_type]).astype(np.float32).reshape(shape)
    if ggml_type == GGMLType.BF16:  # the top half of a float32
        return (raw.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(shape)

    layout, decode = _DECODERS[ggml_type]
    block = BLOCK_SIZES[ggml_type][0]
    blocks = raw.view(layout)
    out = np.empty((len(blocks), block), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // block)
    for start in range(0, len(blocks), step):  # chunks of many blocks, each decoded vectorised
        decode(blocks[start : start + step], out[start : start + step])
    return out.reshape(shape)
