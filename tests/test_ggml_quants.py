"""GGML dequantization: bit-for-bit against the `gguf` package and a scalar port of ggml's reference C."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refllama.formats import ggml_quants
from refllama.formats.ggml_quants import BLOCK_SIZES, QK_K, GGMLType, dequantize, tensor_nbytes

gguf = pytest.importorskip("gguf")  # a test-only dependency: the reference implementation
gguf_quants = gguf.quants

# Byte offsets of each block's fp16 scale fields (d, and m/dmin where present), from ggml's block structs.
FP16_FIELDS: dict[GGMLType, tuple[int, ...]] = {
    GGMLType.Q8_0: (0,),
    GGMLType.Q4_0: (0,),
    GGMLType.Q4_1: (0, 2),
    GGMLType.Q5_0: (0,),
    GGMLType.Q5_1: (0, 2),
    GGMLType.Q2_K: (80, 82),  # after scales[16] and qs[64]
    GGMLType.Q3_K: (108,),  # after hmask[32], qs[64], scales[12]
    GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),  # after ql[128], qh[64], scales[16]
}
QUANTS = list(FP16_FIELDS)
SMALL = [t for t in QUANTS if BLOCK_SIZES[t][0] == 32]
KQUANTS = [t for t in QUANTS if BLOCK_SIZES[t][0] == QK_K]
# The gguf package can quantize these (not the K-quants).
QUANTIZABLE = [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1]


def finite_fp16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random fp16 bit patterns covering zeros, subnormals, normals and both signs, but no Inf/NaN."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    return np.where((bits & 0x7C00) == 0x7C00, bits & ~np.uint16(0x4000), bits).astype(np.uint16)


def with_finite_scales(raw: np.ndarray, ggml_type: GGMLType, rng: np.random.Generator) -> np.ndarray:
    """Overwrite the fp16 scale fields of random block bytes with finite values."""
    blocks = raw.reshape(-1, BLOCK_SIZES[ggml_type][1]).copy()
    for offset in FP16_FIELDS[ggml_type]:
        blocks[:, offset : offset + 2] = finite_fp16_bits(rng, len(blocks)).astype("<u2")[:, None].view(np.uint8)
    return blocks.reshape(-1)


def random_raw(ggml_type: GGMLType, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, tensor_nbytes(ggml_type, int(np.prod(shape))), dtype=np.uint8)
    return with_finite_scales(raw, ggml_type, rng)


def reference(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """The gguf package's dequantization of a flat byte buffer, flattened."""
    return gguf_quants.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType(int(ggml_type))).reshape(-1)


def assert_bits_equal(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint32), expected.reshape(-1).view(np.uint32))


# --- scalar port of ggml-quants.c dequantize_row_* (one block at a time), an oracle independent of gguf ---


def _f16(b: bytes, offset: int) -> np.float32:
    return np.float32(np.frombuffer(b, "<f2", 1, offset)[0])


def _scale_min_k4(j: int, q: bytes) -> tuple[int, int]:
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def c_dequantize_block(ggml_type: GGMLType, b: bytes) -> np.ndarray:
    y: list[np.float32] = []
    t = GGMLType
    if ggml_type in (t.Q4_0, t.Q4_1, t.Q5_0, t.Q5_1):
        d = _f16(b, 0)
        m = _f16(b, 2) if ggml_type in (t.Q4_1, t.Q5_1) else None
        five = ggml_type in (t.Q5_0, t.Q5_1)
        qh = int.from_bytes(b[2 + 2 * (m is not None) :][:4], "little") if five else 0
        qs = b[-16:]
        lo, hi = [], []
        for j in range(16):
            x0, x1 = qs[j] & 0xF, qs[j] >> 4
            if five:
                x0 |= ((qh >> j) << 4) & 0x10
                x1 |= (qh >> (j + 12)) & 0x10
            off = 0 if m is not None else (16 if five else 8)
            lo.append(x0 - off)
            hi.append(x1 - off)
        y = [d * x if m is None else d * x + m for x in lo + hi]
    elif ggml_type == t.Q8_0:
        d = _f16(b, 0)
        y = [np.float32(q) * d for q in np.frombuffer(b, np.int8, 32, 2)]
    elif ggml_type == t.Q8_K:
        d = np.frombuffer(b, "<f4", 1, 0)[0]
        y = [d * np.float32(q) for q in np.frombuffer(b, np.int8, QK_K, 4)]
    elif ggml_type == t.Q2_K:
        scales, qs, d, dmin = b[:16], b[16:80], _f16(b, 80), _f16(b, 82)
        i = 0
        for n in range(2):
            q = qs[32 * n :]
            for shift in (0, 2, 4, 6):
                for half in range(2):
                    sc = scales[i]
                    i += 1
                    dl, ml = d * (sc & 0xF), dmin * (sc >> 4)
                    y += [dl * ((q[e + 16 * half] >> shift) & 3) - ml for e in range(16)]
    elif ggml_type == t.Q3_K:
        hm, qs, sraw, d = b[:32], b[32:96], b[96:108], _f16(b, 108)
        scales = [((sraw[i % 8] >> (4 * (i // 8))) & 0xF) | (((sraw[8 + i % 4] >> (2 * (i // 4))) & 3) << 4)
                  for i in range(16)]
        i, m = 0, 1
        for n in range(2):
            q = qs[32 * n :]
            for shift in (0, 2, 4, 6):
                for half in range(2):
                    dl = d * (scales[i] - 32)
                    i += 1
                    lanes = range(16 * half, 16 * half + 16)
                    y += [dl * (((q[e] >> shift) & 3) - (0 if hm[e] & m else 4)) for e in lanes]
                m <<= 1
    elif ggml_type in (t.Q4_K, t.Q5_K):
        d, dmin, scales = _f16(b, 0), _f16(b, 2), b[4:16]
        qh, ql = (b[16:48], b[48:]) if ggml_type == t.Q5_K else (bytes(32), b[16:])
        u1, u2 = 1, 2
        for j in range(4):
            (s1, m1), (s2, m2) = _scale_min_k4(2 * j, scales), _scale_min_k4(2 * j + 1, scales)
            d1, dm1, d2, dm2 = d * s1, dmin * m1, d * s2, dmin * m2
            q = ql[32 * j :]
            y += [d1 * ((q[e] & 0xF) + (16 if qh[e] & u1 else 0)) - dm1 for e in range(32)]
            y += [d2 * ((q[e] >> 4) + (16 if qh[e] & u2 else 0)) - dm2 for e in range(32)]
            u1, u2 = u1 << 2, u2 << 2
    elif ggml_type == t.Q6_K:
        ql, qh, sc, d = b[:128], b[128:192], np.frombuffer(b, np.int8, 16, 192), _f16(b, 208)
        for n in range(2):
            out = [np.float32(0)] * 128
            for e in range(32):
                i = e // 16
                a, h = ql[64 * n + e], qh[32 * n + e]
                c = ql[64 * n + e + 32]
                q1 = ((a & 0xF) | (((h >> 0) & 3) << 4)) - 32
                q2 = ((c & 0xF) | (((h >> 2) & 3) << 4)) - 32
                q3 = ((a >> 4) | (((h >> 4) & 3) << 4)) - 32
                q4 = ((c >> 4) | (((h >> 6) & 3) << 4)) - 32
                s = sc[8 * n :]
                out[e], out[e + 32] = d * s[i] * q1, d * s[i + 2] * q2
                out[e + 64], out[e + 96] = d * s[i + 4] * q3, d * s[i + 6] * q4
            y += out
    else:
        raise AssertionError(ggml_type)
    return np.array(y, dtype=np.float32)


# --- tests ---


def test_type_table_matches_gguf():
    for t in GGMLType:
        g = gguf.GGMLQuantizationType[t.name]
        assert int(g) == int(t)
        assert gguf.GGML_QUANT_SIZES[g] == BLOCK_SIZES[t]


@pytest.mark.parametrize("ggml_type", [*QUANTS, GGMLType.Q8_K], ids=lambda t: t.name)
def test_matches_scalar_port_of_ggml_c(ggml_type):
    block, size = BLOCK_SIZES[ggml_type]
    rng = np.random.default_rng(int(ggml_type))
    raw = rng.integers(0, 256, 2 * size, dtype=np.uint8)
    if ggml_type == GGMLType.Q8_K:  # fp32 d: keep it finite
        raw.reshape(2, size)[:, :4] = np.float32(rng.standard_normal(2))[:, None].view(np.uint8)
    else:
        raw = with_finite_scales(raw, ggml_type, rng)
    expected = np.concatenate([c_dequantize_block(ggml_type, raw[i * size : (i + 1) * size].tobytes())
                               for i in range(2)])
    assert_bits_equal(dequantize(raw, ggml_type, (2, block)), expected)


SHAPES_32 = [(32,), (4, 64), (3, 5, 32), (7, 96)]
SHAPES_K = [(256,), (3, 512), (2, 2, 256)]


@pytest.mark.parametrize(("ggml_type", "shape"), [(t, s) for t in SMALL for s in SHAPES_32]
                         + [(t, s) for t in KQUANTS for s in SHAPES_K], ids=str)
def test_random_blocks_match_gguf(ggml_type, shape):
    raw = random_raw(ggml_type, shape, seed=len(shape) * 100 + int(ggml_type))
    got = dequantize(raw, ggml_type, shape)
    assert got.shape == shape
    assert got.flags.writeable and got.flags.c_contiguous
    assert_bits_equal(got, reference(raw, ggml_type))


@given(ggml_type=st.sampled_from(QUANTS), n_blocks=st.integers(1, 6), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_hypothesis_blocks_match_gguf(ggml_type, n_blocks, seed, data):
    block, size = BLOCK_SIZES[ggml_type]
    raw = np.frombuffer(data.draw(st.binary(min_size=n_blocks * size, max_size=n_blocks * size)), np.uint8)
    raw = with_finite_scales(raw, ggml_type, np.random.default_rng(seed))
    assert_bits_equal(dequantize(raw, ggml_type, (n_blocks, block)), reference(raw, ggml_type))


@pytest.mark.parametrize("ggml_type", QUANTS, ids=lambda t: t.name)
def test_nonfinite_scales_match_gguf(ggml_type):
    """Unfiltered random bytes (fp16 Inf/NaN scales included) still agree bit for bit."""
    block, size = BLOCK_SIZES[ggml_type]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, 64 * size, dtype=np.uint8)
    for offset in FP16_FIELDS[ggml_type]:  # make some scales Inf and NaN for sure
        raw.reshape(64, size)[:8, offset : offset + 2] = np.array([0x7C00, 0xFC00, 0x7E01, 0xFD00] * 2,
                                                                   "<u2")[:, None].view(np.uint8)
    with np.errstate(all="ignore"):
        assert_bits_equal(dequantize(raw, ggml_type, (64 * block,)), reference(raw, ggml_type))


@pytest.mark.parametrize("ggml_type", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_real_data_round_trip(ggml_type):
    rng = np.random.default_rng(1)
    data = (rng.standard_normal((6, 256)) * 0.02).astype(np.float32)
    data[:, ::37] *= 20  # a few outliers, as real weights have
    data[0, :32] = 0  # an all-zero block (d = 0)
    raw = gguf_quants.quantize(data, gguf.GGMLQuantizationType(int(ggml_type))).reshape(-1)
    got = dequantize(raw, ggml_type, data.shape)
    assert_bits_equal(got, reference(raw, ggml_type))
    rel_rms = np.sqrt(np.mean((got - data) ** 2) / np.mean(data**2))
    bits = {GGMLType.Q8_0: 8, GGMLType.Q5_0: 5, GGMLType.Q5_1: 5}.get(ggml_type, 4)
    assert rel_rms < 2.0 ** (2 - bits)  # 0.016 for 8 bits, 0.125 for 5, 0.25 for 4
    assert np.all(got[0, :32] == 0)


def test_f16_all_bit_patterns():
    raw = np.arange(1 << 16, dtype="<u2").view(np.uint8)
    got = dequantize(raw, GGMLType.F16, (256, 256))
    assert_bits_equal(got, raw.view("<f2").astype(np.float32))
    assert_bits_equal(got, reference(raw, GGMLType.F16))


def test_bf16_all_bit_patterns():
    raw = np.arange(1 << 16, dtype="<u2").view(np.uint8)
    got = dequantize(raw, GGMLType.BF16, (1 << 16,))
    assert_bits_equal(got, (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32))
    assert_bits_equal(got, reference(raw, GGMLType.BF16))
    finite = np.isfinite(got)
    np.testing.assert_array_equal(got[finite], raw.view(ml_dtypes.bfloat16)[finite].astype(np.float32))


def test_f32_is_an_exact_copy():
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 1 << 32, 60, dtype=np.uint32)
    bits[:4] = [0x7F800000, 0xFF800000, 0x7FC00001, 0x80000000]  # +-Inf, a NaN with payload, -0.0
    raw = bits.astype("<u4").view(np.uint8)
    raw.flags.writeable = False
    got = dequantize(raw, GGMLType.F32, (3, 4, 5))
    assert got.shape == (3, 4, 5) and got.flags.writeable and not np.shares_memory(got, raw)
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint32), bits)


def test_f64_rounds_to_float32():
    rng = np.random.default_rng(3)
    values = rng.standard_normal(40) * 10.0 ** rng.integers(-50, 50, 40)
    values[:6] = [np.inf, -np.inf, 1e300, -1e-300, -0.0, 1 + 2**-30]
    with np.errstate(over="ignore"):  # 1e300 -> inf
        got = dequantize(values.astype("<f8").view(np.uint8), GGMLType.F64, (8, 5))
        assert_bits_equal(got, values.astype(np.float32))
    nan = dequantize(np.array([np.nan]).view(np.uint8), GGMLType.F64, (1,))
    assert np.isnan(nan).all()


@pytest.mark.parametrize("ggml_type", [GGMLType.F16, GGMLType.Q4_K, GGMLType.Q5_0], ids=lambda t: t.name)
def test_unaligned_read_only_input(ggml_type):
    rng = np.random.default_rng(4)
    raw = rng.integers(0, 256, tensor_nbytes(ggml_type, 512), dtype=np.uint8)
    if ggml_type in FP16_FIELDS:
        raw = with_finite_scales(raw, ggml_type, rng)
    buf = b"\0" + raw.tobytes()
    view = np.frombuffer(buf, np.uint8, offset=1)  # read-only, odd address
    assert not view.flags.writeable
    assert_bits_equal(dequantize(view, ggml_type, (2, 256)), dequantize(raw, ggml_type, (2, 256)))


def test_non_contiguous_input():
    raw = random_raw(GGMLType.Q6_K, (256,), seed=5)
    spread = np.zeros(2 * raw.size, np.uint8)
    spread[::2] = raw
    assert_bits_equal(dequantize(spread[::2], GGMLType.Q6_K, (256,)), dequantize(raw, GGMLType.Q6_K, (256,)))


@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_1, GGMLType.Q3_K], ids=lambda t: t.name)
def test_chunked_decoding(ggml_type, monkeypatch):
    """Tensors larger than one chunk, with a ragged last chunk, decode the same as in one go."""
    shape = (7, 3 * BLOCK_SIZES[ggml_type][0])
    raw = random_raw(ggml_type, shape, seed=6)
    whole = dequantize(raw, ggml_type, shape)
    monkeypatch.setattr(ggml_quants, "_CHUNK_ELEMENTS", 2 * BLOCK_SIZES[ggml_type][0])
    assert_bits_equal(dequantize(raw, ggml_type, shape), whole)
    assert_bits_equal(whole, reference(raw, ggml_type))


def test_empty_tensor():
    got = dequantize(np.zeros(0, np.uint8), GGMLType.Q4_K, (0, 256))
    assert got.shape == (0, 256) and got.dtype == np.float32


def test_wrong_byte_count():
    raw = random_raw(GGMLType.Q4_0, (64,), seed=0)
    for bad in (raw[:-1], np.concatenate([raw, raw[:1]])):
        with pytest.raises(ValueError, match=r"Q4_0 tensor of shape \(64,\) takes 36 bytes, got"):
            dequantize(bad, GGMLType.Q4_0, (64,))
    with pytest.raises(ValueError, match="takes 2048 bytes"):
        dequantize(np.zeros(100, np.uint8), GGMLType.F32, (2, 256))


@pytest.mark.parametrize(("ggml_type", "shape"), [(GGMLType.Q4_0, (33,)), (GGMLType.Q8_0, (2, 24)),
                                                  (GGMLType.Q4_K, (2, 64, 3)), (GGMLType.Q6_K, (100,))])
def test_element_count_not_whole_blocks(ggml_type, shape):
    with pytest.raises(ValueError, match="not a multiple"):
        dequantize(np.zeros(1000, np.uint8), ggml_type, shape)


@pytest.mark.parametrize("ggml_type", [GGMLType.Q8_1, GGMLType.I8, GGMLType.I32, GGMLType.I64],
                         ids=lambda t: t.name)
def test_unsupported_types(ggml_type):
    raw = np.zeros(tensor_nbytes(ggml_type, 32), np.uint8)
    with pytest.raises(ValueError, match=f"cannot dequantize {ggml_type.name}"):
        dequantize(raw, ggml_type, (32,))


def test_bad_raw_array():
    with pytest.raises(ValueError, match="1-D uint8"):
        dequantize(np.zeros(9, np.float32), GGMLType.Q4_0, (32,))
    with pytest.raises(ValueError, match="1-D uint8"):
        dequantize(np.zeros((2, 9), np.uint8), GGMLType.Q4_0, (32,))


def test_accepts_plain_int_type_and_list_shape():
    raw = random_raw(GGMLType.Q8_0, (64,), seed=8)
    assert_bits_equal(dequantize(raw, int(GGMLType.Q8_0), [2, 32]), reference(raw, GGMLType.Q8_0))
