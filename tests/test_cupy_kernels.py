"""The cupy backend's host side, without a GPU and without CuPy: kernel sources, launch plans, upload and layout
decisions, and NumPy models of the kernels' arithmetic (backends/cupy_kernels.py, backends/cuda/).

What needs a device is in tests/test_cupy_backend.py (skipped with "no CUDA device" here); what needs a compiler is
in tests/test_cupy_compile.py.
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refllama.backends import cupy_kernels as ck
from refllama.backends import get_backend, names
from refllama.backends.numpy_backend import NumpyBackend
from refllama.config import ActivationType
from refllama.dtypes import DataType
from refllama.errors import BackendError
from refllama.formats import ggml_quants
from refllama.formats.ggml_quants import GGMLType
from refllama.quant.packing import pack_rows
from refllama.quant.types import Int8Weight, PackedIntWeight, dequantize

# ---------------------------------------------------------------- registry and import


def test_registered_by_its_file_name():
    assert "cupy" in names()


def _cuda_device_present() -> bool:
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def test_without_a_device_the_backend_refuses_with_a_clear_error():
    if _cuda_device_present():
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackendError, match="cupy"):  # not installed (with the pip hint), or no device
        get_backend("cupy")


# ---------------------------------------------------------------- sources


@pytest.mark.parametrize("module", sorted(ck.MODULES))
def test_sources_are_self_contained(module):
    """No header but common.cuh, spliced in once: the same text compiles under NVRTC and nvcc without -I."""
    text = ck.module_source(module)
    assert "#include" not in text
    assert text.count("---- common.cuh ----") == 1
    assert 'extern "C"' in text


def test_every_cuda_file_is_a_module():
    files = {p.stem for p in ck.CUDA_DIR.glob("*.cu")}
    assert files == set(ck.MODULES)
    assert (ck.CUDA_DIR / ck.COMMON).is_file()


def _define(module: str, name: str) -> int:
    m = re.search(rf"#define {name} (\d+)", (ck.CUDA_DIR / f"{module}.cu").read_text())
    assert m, f"{name} not defined in {module}.cu"
    return int(m.group(1))


def test_launch_constants_match_the_sources():
    assert (ck.GEMV_WARPS, ck.GEMV_ROWS) == (_define("gemv", "GEMV_WARPS"), _define("gemv", "GEMV_ROWS"))
    assert ck.DQ_WARPS == _define("dequant", "DQ_WARPS")
    assert (ck.I8_WARPS, ck.I8_ROWS) == (_define("int8_matmul", "I8_WARPS"), _define("int8_matmul", "I8_ROWS"))
    assert (ck.G_BM, ck.G_BN) == (_define("int8_matmul", "G_BM"), _define("int8_matmul", "G_BN"))
    assert ck.ATT_MAX_CHUNKS == _define("attention", "ATT_MAX_CHUNKS")


def test_every_activation_and_dtype_has_a_kernel():
    assert set(ck.ACTIVATION_CODES) == set(ActivationType)
    assert set(ck.ACTIVATION_CODES.values()) == {0, 1, 2, 3}
    assert set(ck.DTYPE_SUFFIX) == {DataType.F32, DataType.F64, DataType.F16, DataType.BF16}
    for suffix in ck.SUFFIXES:
        assert f"gated_activation_{suffix}" in ck.MODULES["activation"]
        assert f"attention_decode_{suffix}" in ck.MODULES["attention"]


PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'good' for 'sm_90'
ptxas info    : Function properties for good
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4608 bytes smem
ptxas info    : Compiling entry function 'bad' for 'sm_90'
ptxas info    : Function properties for bad
    8 bytes stack frame, 8 bytes spill stores, 32 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
"""


def test_ptxas_report_is_parsed_and_spills_fail_the_check():
    kernels = ck.parse_ptxas_log(PTXAS_LOG)
    assert kernels == {"good": ck.KernelInfo(40, 0, 0, 0, 4608), "bad": ck.KernelInfo(255, 8, 8, 32, 0)}
    result = ck.CompileResult("rope", "90", "nvcc", 0.1, b"", PTXAS_LOG, kernels)
    problems = "\n".join(result.problems())
    assert "bad: 8 bytes spill stores, 32 bytes spill loads" in problems
    assert "bad: 8 bytes of stack frame" in problems
    assert "missing entry points: rope_bf16, rope_f16, rope_f32, rope_f64" in problems
    assert "not listed in cupy_kernels.MODULES: bad, good" in problems
    clean = ck.CompileResult("rope", "90", "nvcc", 0.1, b"", "",
                             {name: ck.KernelInfo(32, 0, 0, 0, 0) for name in ck.MODULES["rope"]})
    assert clean.problems() == []


# ---------------------------------------------------------------- launch plans


@given(st.integers(1, 8), st.integers(1, 5000), st.integers(1, 4096), st.sampled_from([2, 4, 8]))
def test_gemv_covers_every_row_with_whole_vectors(M, N, K, itemsize):
    launch = ck.gemv_launch("f32", itemsize, M, N, K)
    if K % (16 // itemsize):
        assert launch is None
        return
    mt = int(launch.kernel.rsplit("_m", 1)[1])
    assert mt >= M and (mt == 1 or mt // 2 < M)
    rows_per_block = ck.GEMV_WARPS * ck.GEMV_ROWS
    assert launch.grid[0] * rows_per_block >= N > (launch.grid[0] - 1) * rows_per_block
    assert launch.block == (32 * ck.GEMV_WARPS,)


def test_more_than_eight_tokens_is_a_gemm():
    assert ck.gemv_launch("f32", 4, 9, 64, 64) is None
    assert ck.dequant_gemv_launch("f32", "p4", 9, 64, 64) is None
    assert ck.int8_launch("f32", 9, 64, 64).kernel == "int8_gemm_f32"


@given(st.integers(1, 8), st.integers(1, 5000), st.integers(1, 4096), st.sampled_from(["p4", "p8", "s8", "p4m"]))
def test_dequant_gemv_needs_whole_chunks(M, N, K, kind):
    launch = ck.dequant_gemv_launch("bf16", kind, M, N, K)
    if K % 32:
        assert launch is None
        return
    rows = 4 if M == 1 else 2
    assert launch.kernel == f"dequant_gemv_bf16_{kind}_m{1 if M == 1 else 8}"
    assert launch.grid[0] * ck.DQ_WARPS * rows >= N > (launch.grid[0] - 1) * ck.DQ_WARPS * rows


@given(st.integers(1, 300), st.integers(1, 3000), st.integers(1, 3000))
def test_int8_tiles_cover_the_output(M, N, K):
    launch = ck.int8_launch("f64", M, N, K)
    if launch.kernel.startswith("int8_gemv"):
        assert M <= 8 and K % 16 == 0
        assert launch.grid[0] * ck.I8_WARPS * ck.I8_ROWS >= N
    else:
        assert launch.grid == (ck.cdiv(N, ck.G_BN), ck.cdiv(M, ck.G_BM)) and launch.block == (256,)


@given(st.integers(1, 2), st.sampled_from([(4, 4), (8, 2), (9, 3), (32, 8), (32, 1), (64, 4), (6, 6)]),
       st.integers(1, 20), st.integers(1, 5000), st.sampled_from([16, 24, 64, 128, 256, 320]),
       st.sampled_from([4, 8]), st.sampled_from([1, 108, 132]))
def test_attention_plan_splits_the_cache_without_empty_splits(B, heads, T, S, D, acc, sms):
    H, KV = heads
    plan = ck.attention_plan("f32", B, H, KV, T, S, D, acc, sms)
    if T > ck.ATTENTION_KERNEL_MAX_T or D > 256:
        assert plan is None
        return
    G = H // KV
    assert plan.heads_per_block <= min(G, 8) and ck.cdiv(G, plan.heads_per_block) * plan.heads_per_block >= G
    assert plan.launch.block == (32 * plan.heads_per_block,)
    assert plan.launch.grid == (B * T * KV * ck.cdiv(G, plan.heads_per_block), plan.splits)
    assert plan.launch.shared_mem <= ck.SHARED_MEMORY_LIMIT
    assert plan.split_len % plan.tile_slots == 0 and plan.tile_slots <= 32
    assert plan.splits * plan.split_len >= S > (plan.splits - 1) * plan.split_len  # no split is empty
    if plan.splits > 1:
        assert plan.split_len >= 64 or plan.split_len >= plan.tile_slots


def test_rms_norm_threads():
    assert ck.rms_norm_launch("f32", 7, 576).block == (160,)
    assert ck.rms_norm_launch("f32", 7, 16).block == (32,)
    assert ck.rms_norm_launch("f32", 7, 8192).block == (1024,)
    assert ck.rms_norm_launch("f32", 7, 8192).grid == (7,)


# ---------------------------------------------------------------- the attention kernel's algorithm, in NumPy


def _attention_like_the_kernel(q, k, v, mask, plan):
    """attention_decode + attention_combine in float64: tiles of TS slots, a running max, sum and accumulator per
    split, masked slots at the lowest finite value, then the merge of the splits."""
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    lowest = np.finfo(np.float64).min
    out = np.empty_like(q)
    for b, h, t in np.ndindex(B, H, T):
        kv = h // G
        parts = []
        for split in range(plan.splits):
            m, total, acc = -np.inf, 0.0, np.zeros(D)
            lo, hi = split * plan.split_len, min(S, (split + 1) * plan.split_len)
            for s0 in range(lo, hi, plan.tile_slots):
                s1 = min(hi, s0 + plan.tile_slots)
                scores = k[b, kv, s0:s1] @ q[b, h, t] * D**-0.5
                scores = np.where(mask[b, t, s0:s1], scores, lowest)
                m_new = max(m, scores.max())
                correction = np.exp(m - m_new)
                p = np.exp(scores - m_new)
                total = total * correction + p.sum()
                acc = acc * correction + p @ v[b, kv, s0:s1]
                m = m_new
            parts.append((m, total, acc))
        M = max(m for m, _, _ in parts)
        L = sum(total * np.exp(m - M) for m, total, _ in parts)
        out[b, h, t] = sum(acc * np.exp(m - M) for m, _, acc in parts) / L
    return out


@pytest.mark.parametrize("heads,T,S,num_sms", [((4, 2), 1, 300, 132), ((6, 3), 3, 150, 132), ((8, 8), 1, 33, 1),
                                               ((4, 1), 2, 700, 132)])
def test_split_online_softmax_equals_the_numpy_backend(heads, T, S, num_sms):
    """Including fully masked rows (a left-padded row's first queries), which average V uniformly, and a split whose
    slots are all masked."""
    H, KV = heads
    B, D = 2, 16
    rng = np.random.default_rng(S)
    q, k, v = (rng.standard_normal(shape) for shape in [(B, H, T, D), (B, KV, S, D), (B, KV, S, D)])
    past = S - T
    mask = np.broadcast_to(np.arange(S)[None, :] <= (past + np.arange(T))[:, None], (B, T, S)).copy()
    mask[1, :, : S // 2 + 3] = False  # left padding over more than one split
    mask[1, 0, :] = False  # a padding query: nothing allowed
    plan = ck.attention_plan("f64", B, H, KV, T, S, D, 8, num_sms)
    assert plan is not None and (plan.splits > 1 or S < 128)
    expected = NumpyBackend(DataType.F64).attention(q, k, v, mask)
    np.testing.assert_allclose(_attention_like_the_kernel(q, k, v, mask, plan), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- bit tricks of common.cuh and dequant.cu


def _float_to_bf16_like_common_cuh(f: np.ndarray) -> np.ndarray:
    u = f.astype(np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return np.where(nan, (u >> 16) | 0x40, rounded).astype(np.uint16)


def test_bf16_rounding_trick_is_ml_dtypes_rounding():
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32),
                           np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x00000001, 0x007FFFFF,
                                     0x3F808000, 0x3F818000, 0x7FC00000, 0x7F800001, 0xFFC00001], np.uint32)])
    f = bits.view(np.float32)
    ours = _float_to_bf16_like_common_cuh(f)
    with np.errstate(invalid="ignore"):
        ref = f.astype(ml_dtypes.bfloat16).view(np.uint16)
    finite = np.isfinite(f) | np.isinf(f)
    np.testing.assert_array_equal(ours[finite], ref[finite])
    assert np.isnan(ours[~finite].view(ml_dtypes.bfloat16).astype(np.float32)).all()


def test_small_integers_convert_through_the_mantissa():
    u = np.arange(0, 1 << 16, dtype=np.uint32)
    as_float = (u | np.uint32(0x4B000000)).view(np.float32) - np.float32(8388608.0)
    np.testing.assert_array_equal(as_float, u.astype(np.float32))
    signed = np.arange(-128, 128, dtype=np.int8)
    np.testing.assert_array_equal((signed.view(np.uint8) ^ 0x80).astype(np.int32), signed.astype(np.int32) + 128)


# ---------------------------------------------------------------- uploads and weight layouts


BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("src,compute,convert", [
    (np.float32, DataType.F32, "none"), (BF16, DataType.BF16, "none"), (np.float16, DataType.F16, "none"),
    (BF16, DataType.F32, "bf16_to_f32"), (BF16, DataType.F64, "bf16_to_f64"), (BF16, DataType.F16, "bf16_to_f16"),
    (np.float32, DataType.BF16, "f32_to_bf16"), (np.float16, DataType.BF16, "f16_to_bf16"),
    (np.float16, DataType.F32, "astype"), (np.float32, DataType.F64, "astype"), (np.float32, DataType.F16, "astype"),
    (np.float64, DataType.F32, "host"), (np.float64, DataType.BF16, "host"), (np.float64, DataType.F64, "none"),
    (ml_dtypes.float8_e4m3fn, DataType.F32, "host"),
])
def test_upload_conversions(src, compute, convert):
    assert ck.upload_plan(np.dtype(src), compute, True, False) == ck.UploadPlan(
        "host-copy" if convert == "host" else "direct", convert)


def test_upload_layouts():
    a = np.zeros((6, 4), np.int32)
    plan = lambda x: ck.upload_plan(x.dtype, None, x.flags.c_contiguous, x.T.flags.c_contiguous)  # noqa: E731
    assert plan(a) == ck.UploadPlan("direct", "none")
    assert plan(a.T) == ck.UploadPlan("transpose", "none")  # GPTQ's qweight.T: upload as stored
    assert plan(a[:, ::2]) == ck.UploadPlan("host-copy", "none")
    assert ck.upload_plan(np.dtype(np.int8), None, True, False).convert == "none"  # codes keep their type


@given(st.integers(1, 6), st.sampled_from([32, 64, 128]), st.integers(0, 2**32 - 1))
def test_act_order_permutation_makes_groups_contiguous(groups, size, seed):
    rng = np.random.default_rng(seed)
    K = groups * size
    g_idx = rng.permutation(np.arange(K) // size).astype(np.int32)
    perm, found = ck.act_order_permutation(g_idx, K)
    assert found == size
    np.testing.assert_array_equal(g_idx[perm], np.arange(K) // size)


def test_act_order_permutation_refuses_uneven_groups():
    assert ck.act_order_permutation(np.array([0, 0, 1, 1, 1, 2]), 6) is None
    assert ck.act_order_permutation(np.array([0, 1]), 3) is None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_permuted_codes_mean_the_permuted_weight(bits):
    """x @ W.T == x[:, perm] @ W'.T where W' = the permuted layout: its dequantization is W's columns in perm order."""
    rng = np.random.default_rng(bits)
    N, K, size = 5, 128, 32
    codes = rng.integers(0, 1 << bits, (N, K))
    g_idx = rng.permutation(np.arange(K) // size).astype(np.int32)
    scale = rng.standard_normal((N, K // size)).astype(np.float32)
    zero = rng.integers(0, 1 << bits, (N, K // size)).astype(np.int32)
    w = PackedIntWeight(pack_rows(codes, bits), scale, bits, K, zero=zero, g_idx=g_idx)
    perm, group = ck.act_order_permutation(g_idx, K)
    permuted = PackedIntWeight(ck.permute_packed_columns(w.packed, bits, K, perm), scale, bits, K, zero=zero,
                               group_size=group)
    np.testing.assert_array_equal(dequantize(permuted), dequantize(w)[:, perm])


def test_fused_kernel_choice():
    assert [ck.fused_kind(b, False) for b in (2, 3, 4, 8)] == [None, None, "p4", "p8"]
    assert ck.fused_kind(8, True) == "s8" and ck.fused_kind(4, False, mins=True) == "p4m"
    assert ck.fused_groups_ok(None, False) and ck.fused_groups_ok(128, False)
    assert not ck.fused_groups_ok(48, False) and not ck.fused_groups_ok(128, True)


def random_blocks(name: str, N: int, K: int, rng: np.random.Generator) -> np.ndarray:
    """Random ggml blocks with finite fp16 scales, as uint8 rows [N, bytes per row]."""
    blocks = np.zeros((N, K // 32), dtype=np.dtype(ck._GGUF_FIELDS[name]))
    blocks["d"] = (rng.standard_normal((N, K // 32)) * 0.05).astype(np.float16)
    if "m" in blocks.dtype.names:
        blocks["m"] = (rng.standard_normal((N, K // 32)) * 0.05).astype(np.float16)
    low, high = (-128, 128) if name == "Q8_0" else (0, 256)
    blocks["qs"] = rng.integers(low, high, blocks["qs"].shape)
    return blocks.view(np.uint8).reshape(N, -1)


@pytest.mark.parametrize("name", ck.GGUF_BLOCK_TYPES)
def test_gguf_layouts_are_ggml_bit_for_bit(name):
    """The repacked codes, read by the kernels' formula ((code - zero) * d, + m for Q4_1: dequantize() plus the mins),
    give ggml's float32 weights exactly."""
    rng = np.random.default_rng(len(name))
    N, K = 7, 160
    raw = random_blocks(name, N, K, rng)
    ref = ggml_quants.dequantize(raw.reshape(-1), GGMLType[name], (N, K))
    layout = ck.gguf_layout(raw, name, (N, K))
    assert layout.group_size == 32 and layout.scale.dtype == np.float16
    if layout.signed:
        ours = dequantize(Int8Weight(layout.codes, layout.scale, group_size=32))
    else:
        zero = np.full(layout.scale.shape, layout.zero_default, np.int32)
        ours = dequantize(PackedIntWeight(layout.codes, layout.scale, layout.bits, K, zero=zero, group_size=32))
    if layout.mins is not None:
        ours = ours + layout.mins.astype(np.float32)[:, np.arange(K) // 32]  # float32 add after the product
    np.testing.assert_array_equal(ours, ref)


def test_gguf_layout_errors():
    with pytest.raises(ValueError, match="no kernel layout"):
        ck.gguf_layout(np.zeros((2, 144), np.uint8), "Q4_K", (2, 256))
    with pytest.raises(ValueError, match="whole blocks"):
        ck.gguf_layout(np.zeros((2, 18), np.uint8), "Q4_0", (2, 48))
