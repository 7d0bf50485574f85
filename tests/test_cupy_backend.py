"""The cupy backend on a GPU: kernel by kernel against the references, end to end against HF (golden/).

Every test here needs a CUDA device and skips with "no CUDA device" without one (CI never has one):
tools/device_check.sh runs this file on a GPU machine. Bounds:
* ops, float32 / float64, against the numpy backend in the same dtype on the same inputs: |diff| <= 8 eps * max|ref|
  (each backend's summation order), and bit for bit where the kernels evaluate NumPy's expression operation by
  operation (RoPE, gathers, the cache write, conversions, the W8A8 codes, scales, int32 accumulators and epilogue,
  dequantization);
* ops, float16 / bfloat16, against the numpy backend in float64 on the same (rounded) inputs: 4 eps * max|ref| of
  the half type (the result is rounded once or twice to the half type);
* fixtures, float32, against HF float32: the numpy backend's bounds (2e-5, argmax where the top-1/top-2 margin
  exceeds 1e-3, identical greedy continuations); float64 against HF patched to true float64: 1e-12;
* fixtures, bfloat16 / float16 against HF float32: 0.1 / 0.015 (the mlx backend's bounds, HF's own distance);
* quantized fixtures and SmolLM2: the bounds of tests/test_quant_fixtures.py and tests/test_smollm2.py.
"""

from __future__ import annotations

import json
import os
import zlib

import ml_dtypes
import numpy as np
import pytest

from refllama.testing.plugin import cuda_device_count

if cuda_device_count() == 0:
    pytest.skip("no CUDA device", allow_module_level=True)
cp = pytest.importorskip("cupy", reason="cupy not installed")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import refllama  # noqa: E402
from refllama.backends import cupy_kernels as ck  # noqa: E402
from refllama.backends import get_backend  # noqa: E402
from refllama.config import ActivationType  # noqa: E402
from refllama.dtypes import DataType  # noqa: E402
from refllama.formats.checkpoint import Linear  # noqa: E402
from refllama.formats.ggml_quants import GGMLType  # noqa: E402
from refllama.quant import gguf_blocks  # noqa: E402
from refllama.quant.int8 import int8_accumulate, quantize_tokens_hf, quantize_tokens_vllm, w8a8_matmul  # noqa: E402
from refllama.quant.packing import pack_rows  # noqa: E402
from refllama.quant.types import ActivationQuant, Int8Weight, PackedIntWeight, dequantize  # noqa: E402
from refllama.testing.golden import W8A8_HF_ATOL, W8A8_HF_TOP1  # noqa: E402

from conftest import (  # noqa: E402
    F32_ATOL,
    F64_ATOL,
    FIXTURE_NAMES,
    FIXTURES,
    GOLDEN,
    HALF_ATOL,
    LENGTHS,
    QUANT_NAMES,
    assert_close,
    assert_smollm2_logits,
    decode_rows,
    engine_cache,
    golden,
    load_npz,
    quant_engine,
    quant_golden,
)
from test_cupy_kernels import random_blocks  # noqa: E402
from test_quant_fixtures import reference_key  # noqa: E402

ALL_TYPES = [DataType.F32, DataType.F64, DataType.F16, DataType.BF16]


# ---------------------------------------------------------------- op by op


class Ops:
    """The cupy backend in `dtype` and its reference: the numpy backend in the same dtype for float32/float64, in
    float64 for the half types."""

    def __init__(self, dtype: DataType, seed: int = 0):
        self.gpu = get_backend("cupy", dtype)
        self.ref = get_backend("numpy", dtype if dtype in (DataType.F32, DataType.F64) else DataType.F64)
        self.np_dtype = np.dtype(dtype.numpy_dtype)
        self.eps = float(ml_dtypes.finfo(self.np_dtype).eps)
        self.factor = 8 if dtype in (DataType.F32, DataType.F64) else 4
        self.rng = np.random.default_rng(seed)

    def host(self, *shape: int, scale: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(self.np_dtype)

    def inputs(self, *shape: int, scale: float = 1.0):
        """The same values, rounded to the compute dtype, for both backends."""
        host = self.host(*shape, scale=scale)
        return self.gpu.asarray(host), self.ref.asarray(host)

    def check(self, out, expected: np.ndarray, exact: bool = False) -> None:
        got = self.gpu.to_numpy(out)
        assert got.dtype == self.np_dtype and got.shape == expected.shape
        if exact:
            np.testing.assert_array_equal(got, expected)
            return
        atol = self.factor * self.eps * np.abs(expected).max()
        np.testing.assert_allclose(got.astype(np.float64), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,K", [(1, 96), (3, 96), (8, 256), (5, 100), (20, 96)])  # GEMV, GEMV, GEMV, cuBLAS x2
def test_linear(dtype, bias, M, K):
    ops = Ops(dtype, seed=M * K)
    x, x_ref = ops.inputs(M, K, scale=2)
    w, w_ref = ops.inputs(83, K, scale=0.1)
    b, b_ref = ops.inputs(83) if bias else (None, None)
    ops.check(ops.gpu.linear(x, Linear(w, b)), ops.ref.linear(x_ref, Linear(w_ref, b_ref)))


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("D", [16, 576, 2048])
def test_rms_norm(dtype, D):
    ops = Ops(dtype, seed=D)
    x, x_ref = ops.inputs(2, 7, D, scale=3)
    w, w_ref = ops.inputs(D)
    ops.check(ops.gpu.rms_norm(x, w, 1e-5), ops.ref.rms_norm(x_ref, w_ref, 1e-5))


@pytest.mark.parametrize("dtype", ALL_TYPES)
def test_apply_rope_on_the_models_strided_view(dtype):
    """q arrives as (B, T, H, D) memory transposed to (B, H, T, D); float32/float64 match NumPy bit for bit."""
    ops = Ops(dtype, seed=3)
    B, H, T, D = 2, 6, 5, 32
    host = ops.host(B, T, H, D)
    angles = ops.rng.uniform(-50, 50, (B, 1, T, D // 2))
    angles = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(angles), np.sin(angles)  # float64, as rope.cos_sin gives them
    expected = ops.ref.apply_rope(ops.ref.asarray(host).transpose(0, 2, 1, 3), ops.ref.asarray(cos),
                                  ops.ref.asarray(sin))
    got = ops.gpu.apply_rope(ops.gpu.asarray(host).transpose(0, 2, 1, 3), ops.gpu.asarray(cos), ops.gpu.asarray(sin))
    ops.check(got, expected, exact=dtype in (DataType.F32, DataType.F64))


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("act", list(ActivationType))
def test_gated_activation(dtype, act):
    ops = Ops(dtype, seed=4)
    gate, gate_ref = ops.inputs(3, 200, scale=3)
    up, up_ref = ops.inputs(3, 200)
    ops.check(ops.gpu.gated_activation(gate, up, act), ops.ref.gated_activation(gate_ref, up_ref, act))


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 3), (8, 1), (32, 8)])
@pytest.mark.parametrize("T,past", [(1, 0), (1, 7), (5, 0), (5, 4), (1, 1000), (3, 700), (20, 0), (20, 30)])
@pytest.mark.parametrize("head_dim", [16, 24, 64, 128])
def test_attention_gqa_and_masks(dtype, heads, T, past, head_dim):
    """Decode kernel (T <= 16, one split or several) and the cuBLAS path (T = 20); causal masks with left padding,
    including fully masked rows (padding queries), which stay finite and average V uniformly."""
    H, KV = heads
    B, S = 2, past + T
    ops = Ops(dtype, seed=H * 100 + T * 10 + past)
    q, q_ref = ops.inputs(B, H, T, head_dim)
    k, k_ref = ops.inputs(B, KV, S, head_dim)
    v, v_ref = ops.inputs(B, KV, S, head_dim)
    mask = np.broadcast_to(np.arange(S)[None, :] <= (past + np.arange(T))[:, None], (B, T, S)).copy()
    mask[1, :, : S // 2 + 1] = False
    expected = ops.ref.attention(q_ref, k_ref, v_ref, mask)
    out = ops.gpu.attention(q, k, v, ops.gpu.asarray(mask))
    assert np.isfinite(ops.gpu.to_numpy(out).astype(np.float64)).all()
    ops.check(out, expected)


@pytest.mark.parametrize("dtype", [DataType.F32, DataType.BF16])
def test_attention_reads_the_cache_buffers_in_place(dtype):
    """k, v as the model passes them: prefixes of preallocated (B, KV, max_len, D) buffers (strided views)."""
    ops = Ops(dtype, seed=9)
    B, H, KV, D, S, max_len = 1, 8, 2, 64, 300, 512
    kbuf, vbuf = ops.gpu.zeros((B, KV, max_len, D)), ops.gpu.zeros((B, KV, max_len, D))
    k_host, v_host = ops.host(B, KV, S, D), ops.host(B, KV, S, D)
    ops.gpu.cache_write(kbuf, ops.gpu.asarray(k_host), 0)
    ops.gpu.cache_write(vbuf, ops.gpu.asarray(v_host), 0)
    q, q_ref = ops.inputs(B, H, 1, D)
    mask = np.ones((B, 1, S), bool)
    expected = ops.ref.attention(q_ref, ops.ref.asarray(k_host), ops.ref.asarray(v_host), mask)
    ops.check(ops.gpu.attention(q, kbuf[:, :, :S], vbuf[:, :, :S], ops.gpu.asarray(mask)), expected)


def test_embedding_is_an_exact_gather():
    xp = get_backend("cupy", DataType.BF16)
    table = np.random.default_rng(5).standard_normal((50, 16)).astype(ml_dtypes.bfloat16)
    ids = np.random.default_rng(6).integers(0, 50, (2, 7))
    out = xp.to_numpy(xp.embedding(xp.asarray(table), xp.asarray(ids)))
    np.testing.assert_array_equal(out.view(np.uint16), table[ids].view(np.uint16))


@pytest.mark.parametrize("dtype", ALL_TYPES)
def test_asarray_rounds_once_and_keeps_integers(dtype, tmp_path):
    """Every upload path (direct, transposed, strided copy; device conversion kernels, astype, host rounding) gives
    what NumPy/ml_dtypes give."""
    xp = get_backend("cupy", dtype)
    x64 = np.random.default_rng(7).standard_normal((4, 6)) * 3
    sources = [x64, x64.T, x64[:, ::2], x64.astype(np.float32), x64.astype(ml_dtypes.bfloat16),
               x64.astype(np.float16), x64.astype(np.float32).T, x64.astype(ml_dtypes.bfloat16).T]
    for source in sources:
        a = xp.asarray(source)
        assert a.dtype == xp.np_dtype and a.flags.c_contiguous
        expected = np.asarray(source).astype(dtype.numpy_dtype)
        np.testing.assert_array_equal(xp.to_numpy(a).view(np.uint8), np.ascontiguousarray(expected).view(np.uint8))
    path = tmp_path / "weights.bin"
    x64.astype(ml_dtypes.bfloat16).tofile(path)
    mapped = np.memmap(path, dtype=ml_dtypes.bfloat16, mode="r", shape=(4, 6))  # read-only, as safetensors views
    np.testing.assert_array_equal(xp.to_numpy(xp.asarray(mapped)).astype(np.float64),
                                  np.asarray(mapped).astype(dtype.numpy_dtype).astype(np.float64))
    ids, mask, codes = np.arange(6).reshape(2, 3), np.array([[True, False]]), np.arange(-3, 3, dtype=np.int8)
    assert xp.asarray(ids).dtype == np.int64 and xp.asarray(mask).dtype == np.bool_
    np.testing.assert_array_equal(xp.to_numpy(xp.asarray(codes)), codes)


def test_to_numpy_round_trips_bfloat16_bits():
    xp = get_backend("cupy", DataType.BF16)
    bits = np.arange(0, 2**16, 7, dtype=np.uint16)
    bits = bits[np.isfinite(bits.view(ml_dtypes.bfloat16).astype(np.float32))]
    out = xp.to_numpy(xp.asarray(bits.view(ml_dtypes.bfloat16)))
    assert out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out.view(np.uint16), bits)


@pytest.mark.parametrize("dtype", ALL_TYPES)
def test_zeros_and_cache_write_in_place(dtype):
    xp = get_backend("cupy", dtype)
    buffer = xp.zeros((2, 3, 10, 4))
    pointer = buffer.data.ptr
    expected = np.zeros((2, 3, 10, 4), dtype.numpy_dtype)
    for start, T in [(0, 3), (3, 1), (4, 5)]:
        values = np.random.default_rng(start).standard_normal((2, 3, T, 4)).astype(dtype.numpy_dtype)
        assert xp.cache_write(buffer, xp.asarray(values), start) is buffer
        expected[:, :, start:start + T] = values
        np.testing.assert_array_equal(xp.to_numpy(buffer), expected)
    assert buffer.data.ptr == pointer


# ---------------------------------------------------------------- W8A8: exact where the reference is exact


def _tokens_with_ties(rng: np.random.Generator, M: int, K: int, dtype) -> np.ndarray:
    x = rng.standard_normal((M, K)).astype(dtype) * 3
    x[0] = 0  # an all-zero row
    if M > 1:
        x[1, 5] = -np.abs(x[1]).max() * 2  # negative absmax: the -127.5 tie of the "hf" formula
    return x


@pytest.mark.parametrize("dtype", [DataType.F32, DataType.F64])
@pytest.mark.parametrize("M,K", [(1, 16), (3, 576), (9, 100), (70, 48)])
def test_token_quantization_is_the_reference_bit_for_bit(dtype, M, K):
    xp = get_backend("cupy", dtype)
    x = _tokens_with_ties(np.random.default_rng(M + K), M, K, dtype.numpy_dtype)
    for semantics, reference in (("hf", quantize_tokens_hf), ("vllm", quantize_tokens_vllm)):
        codes, scales = xp.quantize_tokens(xp.asarray(x), semantics)
        ref_codes, ref_scales = reference(x)
        np.testing.assert_array_equal(xp.to_numpy(codes), ref_codes, err_msg=semantics)
        np.testing.assert_array_equal(xp.to_numpy(scales), ref_scales.reshape(-1), err_msg=semantics)


@pytest.mark.parametrize("M,N,K", [(1, 7, 16), (1, 130, 576), (8, 64, 48), (5, 33, 100), (9, 64, 576),
                                   (70, 130, 100), (200, 65, 1000)])
def test_int32_accumulators_are_exact(M, N, K):
    """dp4a GEMV (M <= 8, K % 16 == 0) and tiled GEMM (the rest, edges included)."""
    xp = get_backend("cupy", DataType.F32)
    rng = np.random.default_rng(M * N + K)
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    w = rng.integers(-128, 128, (N, K), dtype=np.int8)
    a[0, :] = -128  # extreme products
    w[0, :] = -128
    np.testing.assert_array_equal(xp.to_numpy(xp.int8_accumulate(xp.asarray(a), xp.asarray(w))),
                                  int8_accumulate(a, w))


@pytest.mark.parametrize("dtype", [DataType.F32, DataType.F64])
@pytest.mark.parametrize("semantics", ["hf", "vllm"])
@pytest.mark.parametrize("M,per_tensor,bias", [(1, False, False), (4, True, True), (33, False, True)])
def test_w8a8_linear_is_the_reference_bit_for_bit(dtype, semantics, M, per_tensor, bias):
    xp, ref = get_backend("cupy", dtype), get_backend("numpy", dtype)
    rng = np.random.default_rng(M)
    N, K = 96, 128
    x = _tokens_with_ties(rng, M, K, dtype.numpy_dtype)
    q = rng.integers(-127, 128, (N, K), dtype=np.int8)
    scale = (rng.uniform(0.5, 2, (1, 1) if per_tensor else (N, 1)) / 100).astype(np.float32)
    b = rng.standard_normal(N).astype(dtype.numpy_dtype) if bias else None
    w = Int8Weight(q, scale, activation=ActivationQuant(semantics))
    expected = ref.linear(x, Linear(Int8Weight(q, ref.asarray(scale), activation=ActivationQuant(semantics)), b))
    device_w = Int8Weight(xp.asarray(q), xp.asarray(scale), activation=ActivationQuant(semantics))
    got = xp.linear(xp.asarray(x), Linear(device_w, None if b is None else xp.asarray(b)))
    np.testing.assert_array_equal(xp.to_numpy(got), expected)
    np.testing.assert_array_equal(expected, ref.linear(x, Linear(w, b)))  # the host weight means the same


# ---------------------------------------------------------------- weight-only codes and GGUF blocks


def _packed(rng, bits, N, K, group, asym, per_tensor=False, act_order=False):
    codes = rng.integers(0, 1 << bits, (N, K))
    G = 1 if group is None else -(-K // group)
    scale = (rng.uniform(0.5, 2, (1 if per_tensor else N, G)) / 50).astype(ml_dtypes.bfloat16)
    zero = rng.integers(0, 1 << bits, scale.shape).astype(np.int32) if asym else None
    g_idx = rng.permutation(np.arange(K) // group).astype(np.int32) if act_order else None
    return PackedIntWeight(pack_rows(codes, bits), scale, bits, K, zero=zero, group_size=group, g_idx=g_idx)


CODE_CASES = [  # (bits, K, group, asym, per_tensor, act_order)
    (4, 128, 32, False, False, False), (4, 256, 128, True, False, False), (4, 128, None, False, False, False),
    (8, 128, 32, True, False, False), (8, 96, None, False, True, False), (4, 256, 64, True, False, True),
    (3, 96, 32, True, False, False), (2, 64, 32, False, False, False), (5, 40, 8, True, False, False),
    (4, 96, 48, False, False, False),
]


@pytest.mark.parametrize("dtype", [DataType.F32, DataType.F64])
@pytest.mark.parametrize("case", CODE_CASES)
def test_dequantize_on_the_device_is_the_reference(dtype, case):
    xp = get_backend("cupy", dtype)
    w = _packed(np.random.default_rng(zlib.crc32(repr(case).encode())), case[0], 19, *case[1:])
    np.testing.assert_array_equal(xp.to_numpy(xp.dequantize(w)), dequantize(w, dtype.numpy_dtype))


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("case", CODE_CASES)
@pytest.mark.parametrize("M", [1, 3, 12])
def test_weight_only_linear(dtype, case, M):
    """Fused dequant GEMV (M <= 8 where it applies; act-order permuted once) or dequantize + cuBLAS."""
    ops = Ops(dtype, seed=M)
    w = _packed(ops.rng, case[0], 37, *case[1:])
    x, x_ref = ops.inputs(M, w.shape[1])
    b, b_ref = ops.inputs(37)
    expected = ops.ref.linear(x_ref, Linear(w, b_ref))
    ops.check(ops.gpu.linear(x, Linear(w, b)), expected)


@pytest.mark.parametrize("zero_point,group", [(False, None), (True, 32), (False, 64)])
def test_int8_weight_only_linear(zero_point, group):
    ops = Ops(DataType.F32, seed=11)
    N, K = 45, 192
    q = ops.rng.integers(-128, 128, (N, K), dtype=np.int8)
    G = 1 if group is None else K // group
    scale = ops.rng.uniform(0.5, 2, (N, G)).astype(np.float32) / 100
    zp = ops.rng.integers(-10, 10, (N, G), dtype=np.int8) if zero_point else None
    w = Int8Weight(q, scale, zero_point=zp, group_size=group)
    np.testing.assert_array_equal(ops.gpu.to_numpy(ops.gpu.dequantize(w)), dequantize(w))
    for M in (1, 6, 11):
        x, x_ref = ops.inputs(M, K)
        ops.check(ops.gpu.linear(x, Linear(w)), ops.ref.linear(x_ref, Linear(w)))


def _gguf_weight(name: str, N: int, K: int, rng) -> gguf_blocks.GGUFBlockWeight:
    return gguf_blocks.GGUFBlockWeight(random_blocks(name, N, K, rng), GGMLType[name], (N, K))


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("name", ck.GGUF_BLOCK_TYPES)
def test_gguf_blocks(dtype, name):
    """Dequantization (every dtype: ggml's float32 values, then rounded to the compute dtype), the embedding gather,
    and the fused GEMV / prefill products against the numpy backend on the dequantized weight."""
    ops = Ops(dtype, seed=len(name))
    N, K = 70, 576
    w = _gguf_weight(name, N, K, ops.rng)
    dense = gguf_blocks.dequantize(w)  # float32
    if dtype is not DataType.BF16:  # bfloat16 rounds the fp16 scales themselves (docs/cupy.md)
        np.testing.assert_array_equal(ops.gpu.to_numpy(ops.gpu.dequantize(w)), dense.astype(dtype.numpy_dtype))
        ids = np.array([[3, 0, 69], [5, 5, 1]])
        np.testing.assert_array_equal(ops.gpu.to_numpy(ops.gpu.embedding(w, ops.gpu.asarray(ids))),
                                      dense.astype(dtype.numpy_dtype)[ids])
    for M in (1, 4, 10):
        x, x_ref = ops.inputs(M, K)
        ops.check(ops.gpu.linear(x, Linear(w)), ops.ref.linear(x_ref, Linear(ops.ref.asarray(dense))))


# ---------------------------------------------------------------- golden files (HF)


@pytest.fixture(scope="module")
def cupy_engines():
    return engine_cache("cupy")


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("length", LENGTHS)
def test_float32_matches_hf_float32(cupy_engines, name, length):
    g = golden(name)
    ours = cupy_engines(name).logits(g[f"ids_{length}"])
    assert ours.dtype == np.float32
    assert_close(ours, g[f"logits_{length}_f32"], F32_ATOL)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("length", LENGTHS)
def test_float64_matches_hf_true_float64(cupy_engines, name, length):
    g = golden(name)
    ours = cupy_engines(name, "float64").logits(g[f"ids_{length}"])
    np.testing.assert_allclose(ours, g[f"logits_{length}_f64"], rtol=0, atol=F64_ATOL)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_greedy_continuation_matches_hf_generate(cupy_engines, name):
    g = golden(name)
    assert cupy_engines(name).generate_ids(g["ids_10"], max_new_tokens=16) == g["greedy_f32"].tolist()


def test_dynamic_ntk_cached_decoding_follows_hf_semantics(cupy_engines):
    g = golden("dynamic")
    engine = cupy_engines("dynamic")
    rows = decode_rows(engine, g[f"ids_{max(LENGTHS)}"], prefill=16)
    np.testing.assert_allclose(rows, g["cached_decode_f32"], rtol=0, atol=F32_ATOL)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stays_close_to_float32(cupy_engines, name, dtype):
    g = golden(name)
    n = max(LENGTHS)
    ours = cupy_engines(name, dtype).logits(g[f"ids_{n}"])
    assert ours.dtype == np.dtype(DataType.parse(dtype).numpy_dtype)
    np.testing.assert_allclose(ours.astype(np.float32), g[f"logits_{n}_f32"], rtol=0, atol=HALF_ATOL[dtype])


def test_padded_batch_matches_single_sequences(cupy_engines):
    """Left padding through the decode kernel: a batch of two prompts of different lengths, then decode steps."""
    engine = cupy_engines("llama32")
    g = golden("llama32")
    a, b = g["ids_10"], g["ids_48"][:6]
    ids = np.stack([a, np.concatenate([np.zeros(4, np.int64), b])])
    attention = np.stack([np.ones(10, np.int64), np.concatenate([np.zeros(4, np.int64), np.ones(6, np.int64)])])
    positions = np.stack([np.arange(10), np.concatenate([np.zeros(4, np.int64), np.arange(6)])])
    cache = engine.new_cache(2, 12)
    logits = engine.forward(ids, cache, attention, positions)
    np.testing.assert_allclose(logits[0], engine.logits(a), rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(logits[1, 4:], engine.logits(b), rtol=0, atol=F32_ATOL)


@st.composite
def cases(draw):
    name = draw(st.sampled_from(FIXTURE_NAMES))
    # within max_position_embeddings: past it dynamic NTK differs by design
    limit = json.loads((FIXTURES / name / "config.json").read_text())["max_position_embeddings"]
    n = draw(st.integers(1, min(32, limit)))
    ids = draw(st.lists(st.integers(0, 63), min_size=n, max_size=n))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    return name, np.array(ids), cuts


@given(cases())
def test_cached_decoding_equals_full_forward(cupy_engines, case):
    name, ids, cuts = case
    engine = cupy_engines(name)
    full = engine.logits(ids)
    cache = engine.new_cache(1, len(ids) + 3)
    chunks = [engine.forward(piece[None], cache)[0] for piece in np.split(ids, cuts)]
    np.testing.assert_allclose(np.concatenate(chunks), full, rtol=0, atol=F32_ATOL)


# ---------------------------------------------------------------- quantized checkpoints (tests/fixtures/quant)


@pytest.mark.parametrize("name", [n for n in QUANT_NAMES if n != "tiny-w8a8"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_quantized_fixture_matches_the_exact_function_of_the_checkpoint(name, dtype):
    g = quant_golden(name)
    engine = quant_engine(name, "cupy", dtype)
    for prompt in ("a", "b"):
        logits = engine.logits(g[f"ids_{prompt}"])
        assert_close(logits, g[reference_key(name, prompt)], F32_ATOL)
        # decode through the cache: the fused GEMV kernels
        np.testing.assert_allclose(decode_rows(engine, g[f"ids_{prompt}"], prefill=3), logits, rtol=0,
                                   atol=F32_ATOL)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_w8a8_fixture(dtype):
    g = quant_golden("tiny-w8a8")
    vllm, hf = quant_engine("tiny-w8a8", "cupy", dtype, "vllm"), quant_engine("tiny-w8a8", "cupy", dtype)
    for prompt in ("a", "b"):
        assert_close(vllm.logits(g[f"ids_{prompt}"]), g[f"logits_{prompt}_int8vllm"], F32_ATOL)
        ours, ref = hf.logits(g[f"ids_{prompt}"]), g[f"logits_{prompt}"]
        assert np.abs(ours - ref).max() < W8A8_HF_ATOL  # the -127.5 tie (tests/test_quant_fixtures.py)
        assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= W8A8_HF_TOP1


def test_w8a8_layer0_equals_the_golden_exactly():
    g = quant_golden("tiny-w8a8")
    engine = quant_engine("tiny-w8a8", "cupy")
    weight = engine.model.weights.layers[0].self_attention.q_proj.weight
    xp = engine.backend
    x = g["l0_q_proj_x_a"]
    codes, _ = xp.quantize_tokens(xp.asarray(x), "vllm")
    np.testing.assert_array_equal(xp.to_numpy(codes), g["l0_q_proj_vllm_codes_a"])
    np.testing.assert_array_equal(xp.to_numpy(xp.int8_accumulate(codes, weight.q)), g["l0_q_proj_vllm_acc_a"])
    vllm = Int8Weight(weight.q, weight.scale, activation=ActivationQuant("vllm"))
    np.testing.assert_array_equal(xp.to_numpy(xp.linear(xp.asarray(x), Linear(vllm))), g["l0_q_proj_y_vllm_a"])
    host_q, host_scale = xp.to_numpy(weight.q), xp.to_numpy(weight.scale)
    np.testing.assert_array_equal(xp.to_numpy(xp.linear(xp.asarray(x), Linear(weight))),
                                  w8a8_matmul(x, host_q, host_scale, "hf"))


# ---------------------------------------------------------------- SmolLM2 (GGUF Q8_0 + Q4_1 blocks on the device)


def _smollm2_path():
    from refllama.errors import CheckpointError
    from refllama.formats.default_model import default_model_path

    override = os.environ.get("REFLLAMA_SMOLLM2_GGUF")
    if override:
        return override
    try:
        return default_model_path()
    except CheckpointError as e:
        pytest.skip(f"SmolLM2 not installed ({e}); tools/device_check.sh can carry it")


@pytest.fixture(scope="module")
def smollm2():
    return refllama.load(_smollm2_path(), backend="cupy", dtype="float32"), load_npz(GOLDEN / "smollm2.npz")


def test_smollm2_keeps_its_blocks_on_the_device(smollm2):
    engine, _ = smollm2
    layer = engine.model.weights.layers[0]
    assert isinstance(layer.self_attention.q_proj.weight, gguf_blocks.GGUFBlockWeight)
    assert isinstance(engine.model.weights.embeddings, gguf_blocks.GGUFBlockWeight)


@pytest.mark.parametrize("prompt", ["chat", "paragraph", "code", "unicode"])
def test_smollm2_float32_logits_match_hf(smollm2, prompt):
    engine, g = smollm2
    assert_smollm2_logits(engine.logits(g[f"{prompt}_ids"]), g, prompt)


@pytest.mark.parametrize("prompt", ["chat", "paragraph", "code", "unicode"])
def test_smollm2_greedy_continuation_matches_hf(smollm2, prompt):
    engine, g = smollm2
    assert engine.generate_ids(g[f"{prompt}_ids"], 32) == g[f"{prompt}_greedy_f32"].tolist()
