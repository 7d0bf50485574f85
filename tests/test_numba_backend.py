"""What only the numba backend does: bfloat16 matrices and GGUF blocks read as stored (in huge pages), its thread
count and kernel cache, SmolLM2 from its Q4_1 GGUF through the fused kernels, and its peak memory.

Every operation and the golden fixtures, on this backend as on every other, are the conformance suite's
(refllama/testing/conformance.py, run by tests/test_conformance.py; measured values in docs/numba.md). Bounds
here: bfloat16 matrices give the float32 kernel's result on the converted matrix bit for bit; SmolLM2 against HF
float32: 2e-4 (tests/test_smollm2.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import refllama
from refllama.backends import get_backend
from refllama.config import LlamaConfig
from refllama.errors import BackendError
from refllama.formats.checkpoint import load_weight_map
from refllama.formats.ggml_quants import GGMLType
from refllama.formats.gguf import GGUFFile
from refllama.formats.gguf_llama import config_from_gguf
from refllama.formats.safetensors import TensorSource
from refllama.model import ops
from refllama.model.weights import Linear
from refllama.quant.gguf_blocks import GGUFBlockWeight
from refllama.quant.types import ActivationQuant, Int8Weight
from refllama.testing import random_weights

from conftest import GOLDEN, QUANT, SMOLLM2_ATOL, assert_smollm2_logits, decode_rows, load_npz, smollm2_path

pytest.importorskip("numba")

from refllama.backends import numba_gemm, numba_kernels
from refllama.backends.numba_backend import SMALL_BATCH

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def xp():
    return get_backend("numba", "float32")


# ---------------------------------------------------------------- bfloat16 matrices read as stored


@pytest.mark.parametrize("M,N,K", [(1, 5, 7), (1, 70, 64), (3, 8, 64), (9, 4, 33), (13, 7, 576)])
def test_bfloat16_weights_are_read_as_stored_with_the_float32_products(xp, M, N, K):
    """A bfloat16 matrix widened as the kernels read it gives the float32 kernel's result on the converted matrix,
    bit for bit (same products, same order), and its rows through `embedding` are the converted rows."""
    rng = np.random.default_rng(M * 100 + N * 10 + K)
    x = rng.standard_normal((1, M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(BF16)
    assert xp.asarray(w) is w  # kept as stored: no float32 copy
    np.testing.assert_array_equal(xp.linear(x, Linear(w)), xp.linear(x, Linear(w.astype(np.float32))))
    ids = np.array([[0, N - 1], [2, 1]])
    got = xp.embedding(w, ids)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, w.astype(np.float32)[ids])


# ---------------------------------------------------------------- W8A8 prompts through AVX-512 VNNI

needs_vnni = pytest.mark.skipif(not numba_gemm.VNNI, reason="this CPU (or NUMBA_CPU_NAME) has no AVX-512 VNNI")


def _quantize_pack(x: np.ndarray, vllm: bool, threads: int = 2) -> tuple[np.ndarray, np.ndarray]:
    M, K = x.shape
    a4, scales = np.zeros((-(-K // 4), 4 * numba_gemm.padded_tokens(M)), np.uint8), np.empty(M, np.float32)
    numba_gemm.quantize_pack(x, vllm, a4, scales, threads)
    return a4, scales


@needs_vnni
@pytest.mark.parametrize("M,N,K", [(9, 1, 4), (9, 7, 577), (16, 6, 1), (17, 49, 64), (33, 101, 1538),
                                   (48, 48, 576), (130, 13, 100)])
def test_vnni_int8_gemm_is_int8_matmul_bit_for_bit(M, N, K):
    """Tokens just past SMALL_BATCH and odd groups of 16, rows not a multiple of ROWS or CHUNK, K not a multiple
    of 4 (zero-padded): quantize_tokens' codes and scales, and int8_matmul's accumulators and epilogue, both
    semantics, exactly; the tokens split over 1, 2 and 3 threads' shares."""
    rng = np.random.default_rng(M * 1000 + N + K)
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 10, (M, 1))).astype(np.float32)
    x[0, 0] = -np.abs(x[0]).max() * 1.5  # the -127.5 tie: code -128, a + 128 = 0
    x[1] = 0  # an all-zero token
    q = rng.integers(-128, 128, (N, K), dtype=np.int8)
    q4 = np.pad(q, ((0, 0), (0, -K % 4)))
    w_scale = rng.uniform(1e-3, 1, N).astype(np.float32)
    for vllm in (False, True):
        codes, scales = np.empty((M, K), np.int8), np.empty(M, np.float32)
        numba_kernels.quantize_tokens(x, vllm, codes, scales)
        expected = np.empty((M, N), np.float32)
        numba_kernels.int8_matmul(codes, q, w_scale, scales, vllm, expected)
        for threads in (1, 2, 3):
            a4, a_scale = _quantize_pack(x, vllm, threads)
            np.testing.assert_array_equal(a_scale, scales)
            got = np.empty((M, N), np.float32)
            numba_gemm.int8_vnni_gemm(a4, M, q4, q.sum(axis=1, dtype=np.int32), w_scale, a_scale, vllm, got, 2)
            np.testing.assert_array_equal(got, expected)


@needs_vnni
def test_vnni_accumulators_exact_where_the_unsigned_sum_wraps():
    """K = 70000 codes 127 x 127: sum (a + 128) w = 255 * 127 * K passes 2**31 and wraps; after the correction the
    accumulators are the true 127 * 127 * K (< 2**31), as int8_matmul's."""
    M, N, K = 9, 2, 70000
    a4, _ = _quantize_pack(np.ones((M, K), np.float32), False)  # "hf": 1 / (1 / 127.5) -> code 127
    q = np.full((N, K), 127, np.int8)
    q[1, ::2] = -128
    ones = np.ones(N, np.float32)
    got = np.empty((M, N), np.float32)
    numba_gemm.int8_vnni_gemm(a4, M, q, q.sum(axis=1, dtype=np.int32), ones, np.ones(M, np.float32), False, got, 2)
    accumulators = np.full((M, K), 127, np.int64) @ q.T.astype(np.int64)
    assert accumulators.max() == 127 * 127 * K
    np.testing.assert_array_equal(got, accumulators.astype(np.float32))


@needs_vnni
def test_w8a8_prompt_linear_takes_the_vnni_path_and_equals_decode_rows(xp):
    """Through the backend: a 12-token W8A8 Linear (the VNNI GEMM) equals the same tokens one at a time (the
    decode kernel) bit for bit."""
    rng = np.random.default_rng(7)
    q = rng.integers(-128, 128, (37, 201), dtype=np.int8)
    weight = Int8Weight(q, rng.uniform(1e-3, 1, (37, 1)).astype(np.float32), activation=ActivationQuant("hf"))
    x = rng.standard_normal((1, 12, 201)).astype(np.float32)
    together = xp.linear(x, Linear(weight))
    assert xp._prepared[weight].q4 is not None
    one_by_one = np.concatenate([xp.linear(x[:, i:i + 1], Linear(weight)) for i in range(12)], axis=1)
    np.testing.assert_array_equal(together, one_by_one)


# ---------------------------------------------------------------- W8A8 decode through AVX-512 VNNI


def _decode_tokens(T: int, K: int, rng: np.random.Generator) -> np.ndarray:
    """T tokens with the quantizers' edge rows: a -127.5 tie (code -128, byte 0), an all-zero token, a subnormal
    absmax (vLLM's 127 / absmax overflows to inf: codes 0)."""
    x = (rng.standard_normal((T, K)) * rng.uniform(0.1, 10, (T, 1))).astype(np.float32)
    x[0, K // 2] = -np.abs(x[0]).max() * 1.5
    if T > 1:
        x[1] = 0
    if T > 2:
        x[2] = np.float32(1e-45) * rng.integers(-1, 2, K)
    return x


@needs_vnni
@pytest.mark.parametrize("T", range(1, 9))
@pytest.mark.parametrize("N,K", [(1, 1), (7, 5), (13, 63), (3, 64), (37, 130), (33, 577), (9, 1538)])
def test_vnni_decode_matvec_is_int8_matmul_bit_for_bit(T, N, K):
    """1 to SMALL_BATCH tokens, N odd or below DECODE_ROWS, K not a multiple of 4 or 64 (masked last chunk):
    quantize_tokens' codes (+ 128, zero-padded) and scales, and int8_matmul's outputs, both semantics, exactly, on
    1 to 3 threads; a second weight reuses the first call's quantized activations (quantize=False)."""
    rng = np.random.default_rng(T * 10000 + N * 100 + K)
    x = _decode_tokens(T, K, rng)
    q = rng.integers(-128, 128, (N, K), dtype=np.int8)
    w_scale = rng.uniform(1e-3, 1, N).astype(np.float32)
    sums = q.sum(axis=1, dtype=np.int32)
    for vllm in (False, True):
        codes, scales = np.empty((T, K), np.int8), np.empty(T, np.float32)
        numba_kernels.quantize_tokens(x, vllm, codes, scales)
        expected = np.empty((T, N), np.float32)
        numba_kernels.int8_matmul(codes, q, w_scale, scales, vllm, expected)
        for threads in (1, 2, 3):
            a = np.full((T, numba_gemm.decode_width(K)), 77, np.uint8)  # the padding must be overwritten with 0
            a_scale, got = np.empty(T, np.float32), np.empty((T, N), np.float32)
            numba_gemm.int8_vnni_matvec(x, True, a, a_scale, q, sums, w_scale, vllm, got, threads)
            np.testing.assert_array_equal(a[:, :K].astype(np.int16) - 128, codes)
            assert not a[:, K:].any()
            np.testing.assert_array_equal(a_scale, scales)
            np.testing.assert_array_equal(got, expected)
            again = np.empty((T, N), np.float32)
            numba_gemm.int8_vnni_matvec(np.zeros_like(x), False, a, a_scale, q, sums, w_scale, vllm, again, threads)
            np.testing.assert_array_equal(again, expected)  # x unread: a and a_scale are used as they are


@needs_vnni
def test_vnni_decode_exact_at_the_largest_k():
    """K = INT8_MAX_K, codes 127 against rows of 127 and of -128: the unsigned sums wrap int32 many times over,
    the accumulators are the true +-127 * 128 * K (just inside int32)."""
    from refllama.quant.int8 import INT8_MAX_K

    T, N, K = 2, 3, INT8_MAX_K
    x = np.ones((T, K), np.float32)  # "hf": 1 / (1 / 127.5) -> code 127
    q = np.full((N, K), 127, np.int8)
    q[1] = -128
    q[2, ::3] = -128
    got = np.empty((T, N), np.float32)
    a = np.empty((T, numba_gemm.decode_width(K)), np.uint8)
    numba_gemm.int8_vnni_matvec(x, True, a, np.empty(T, np.float32), q, q.sum(axis=1, dtype=np.int32),
                                np.ones(N, np.float32), False, got, 2)
    accumulators = np.full((T, K), 127, np.int64) @ q.T.astype(np.int64)
    assert accumulators.min() == -127 * 128 * K
    np.testing.assert_array_equal(got, accumulators.astype(np.float32) * (np.float32(1) / np.float32(127.5)))


@needs_vnni
@pytest.mark.parametrize("semantics", ["hf", "vllm"])
@pytest.mark.parametrize("M", [1, 3, 9])
def test_w8a8_linears_share_one_quantization_bit_for_bit(xp, semantics, M):
    """The backend's several-Linears operation (q/k/v, gate/up: one input) equals one `linear` per Linear, bias
    included, bit for bit: decode steps through one quantization, prompts (M > SMALL_BATCH) and a group with a
    float Linear Linear by Linear. The decode kernels read the stored rows: no copy of the weight."""
    rng = np.random.default_rng(M)
    K = 70
    weights = [Int8Weight(rng.integers(-128, 128, (n, K), dtype=np.int8),
                          rng.uniform(1e-3, 1, (n, 1)).astype(np.float32), activation=ActivationQuant(semantics))
               for n in (24, 8, 8)]
    layers = [Linear(weights[0]), Linear(weights[1], rng.standard_normal(8).astype(np.float32)), Linear(weights[2])]
    x = _decode_tokens(M, K, rng).reshape(1, M, K)
    expected = [xp.linear(x, layer) for layer in layers]
    for got, want in zip(xp.linears(x, layers), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    mixed = [*layers[:2], Linear(rng.standard_normal((5, K)).astype(np.float32))]
    np.testing.assert_array_equal(xp.linears(x, mixed)[2], xp.linear(x, mixed[2]))
    assert all(np.shares_memory(xp._prepared[w].q, w.q) for w in weights)


# ---------------------------------------------------------------- attention for prompts (numba_gemm.prompt_attention)


@pytest.mark.parametrize("heads", [(6, 3), (8, 1), (4, 4)], ids=["GQA3", "MQA", "MHA"])
@pytest.mark.parametrize("T,past,D", [(32, 0, 64), (33, 0, 24), (70, 37, 64), (129, 3, 16)])
def test_prompt_attention_within_the_attention_bound(xp, heads, T, past, D):
    """From QUERIES positions on, the backend's attention is the blocked kernel: causal masks after `past` cached
    tokens, a left-padded batch row whose first queries see nothing (the reference's uniform average of V), the
    cache's buffer layout, and the same slots in reverse order (allowed keys not a prefix). Bound: the conformance
    suite's attention bound, 4 eps32 max|v| against the float64 reference."""
    assert T >= numba_gemm.QUERIES
    H, KV = heads
    B, S = 2, past + T
    rng = np.random.default_rng(H * 1000 + T * 10 + past)
    ref = get_backend("numpy", "float64")
    mask = np.broadcast_to(np.arange(S)[None, :] <= (past + np.arange(T))[:, None], (B, T, S)).copy()
    mask[1, :, : S // 2 + 1] = False
    mask[1, :3] = False  # padding queries
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((B, H, T, D), (B, KV, S, D), (B, KV, S, D)))
    buffers = [xp.cache_write(xp.zeros((B, KV, S + 5, D)), a, 0)[:, :, :S] for a in (k, v)]
    bound = 4 * np.finfo(np.float32).eps * np.abs(v).max()
    for keys, values, m in ((k, v, mask), (*buffers, mask), (k[:, :, ::-1], v[:, :, ::-1], mask[:, :, ::-1])):
        expected = ref.attention(q.astype(np.float64), keys.astype(np.float64), values.astype(np.float64), m)
        got = xp.attention(q, keys, values, np.ascontiguousarray(m))
        assert np.abs(got - expected).max() <= bound


# ---------------------------------------------------------------- exp in vector lanes (numba_gemm.exp32, silu_mul)


def test_exp32_within_one_and_a_half_ulp():
    """exp32 against float64 exp on a dense grid over its whole normal range and random softmax-like arguments
    (measured max 1.004 ulp); clamped past the ends, never inf or 0."""
    import numba

    @numba.njit
    def exp_all(x, out):
        for i in range(x.shape[0]):
            out[i] = numba_gemm.exp32(x[i])

    x = np.concatenate([np.linspace(-87, 88, 1_000_001, dtype=np.float32),
                        np.random.default_rng(0).uniform(-30, 0, 100_000).astype(np.float32)])
    got = np.empty_like(x)
    exp_all(x, got)
    exact = np.exp(x.astype(np.float64))
    assert (np.abs(got - exact) / np.spacing(exact.astype(np.float32))).max() <= 1.5
    ends = np.empty(2, np.float32)
    exp_all(np.array([-1000, 1000], np.float32), ends)
    assert 0 < ends[0] < 1.2e-38 and np.isfinite(ends[1])


@pytest.mark.parametrize("shape", [(1, 1536), (2, 7), (5, 1536), (32, 1536), (33, 7), (40, 1)])
def test_prompt_silu_mul_within_the_activation_bound(xp, shape):
    """One token's SiLU-mul (numba_kernels.silu_mul, one thread) and, from 2 tokens on, numba_gemm.silu_mul with
    exp32: within the conformance bound, 8 eps32 max|ref|, of the float64 reference, with large, tiny and zero
    gates."""
    rng = np.random.default_rng(shape[1])
    gate = (rng.standard_normal(shape) * 4).astype(np.float32)
    gate.flat[:4] = [0, 100, -100, 1e-30]
    up = rng.standard_normal(shape).astype(np.float32)
    from refllama.config import ActivationType

    got = xp.gated_activation(gate, up, ActivationType.Silu)
    g = gate.astype(np.float64)
    expected = g / (1 + np.exp(-g)) * up
    assert np.abs(got - expected).max() <= 8 * np.finfo(np.float32).eps * np.abs(expected).max()


def test_bfloat16_checkpoint_keeps_its_stored_bytes(xp):
    """Loading a bfloat16 folder keeps its matrices as the file's bytes, read-only (vectors become float32), and the
    logits are bit for bit those of the same backend on the weights converted to float32 first."""
    folder = QUANT / "tiny-llama-bf16"
    engine = refllama.load(folder, backend="numba")
    weights = engine.model.weights
    gate = weights.layers[0].mlp.gate_proj.weight
    assert gate.dtype == BF16 and not gate.flags.writeable
    np.testing.assert_array_equal(gate.view(np.uint16),
                                  TensorSource(folder).get("model.layers.0.mlp.gate_proj.weight").view(np.uint16))
    assert weights.final_norm.dtype == np.float32
    config = LlamaConfig.from_dir(folder)
    converted = load_weight_map(TensorSource(folder), config).map(
        lambda a: a.astype(np.float32) if getattr(a, "dtype", None) == BF16 else a)
    reference = refllama.GenericLlamaEngine(config, converted, xp)
    assert reference.model.weights.layers[0].mlp.gate_proj.weight.dtype == np.float32
    ids = np.arange(1, 40)
    np.testing.assert_array_equal(engine.logits(ids), reference.logits(ids))


# ---------------------------------------------------------------- GGUF blocks: the fused decode matvec


@pytest.mark.parametrize("ggml_type", [GGMLType(kind).name for kind in numba_kernels.GGUF_BLOCKS])
def test_gguf_decode_matvec_on_awkward_shapes(xp, ggml_type):
    """Every block type is read by the fused matvec up to SMALL_BATCH tokens: an odd number of blocks per row, row
    counts around the kernels' 4- and 64-row steps, 1..8 tokens. The dequantization (embedding rows) equals ggml's
    bit for bit. Each product is within 4 eps32 of sum_k |x_k w_k| of the exact (float64) product with the
    dequantized matrix: the scale a float32 dot product's rounding error grows with, so single outputs that cancel
    are held as tightly as the others (measured: at most 1.6 eps32, Q4_0's offset term; NumPy's float32: 0.5)."""
    rng = np.random.default_rng(int(GGMLType[ggml_type]))
    block = numba_kernels.GGUF_BLOCKS[int(GGMLType[ggml_type])][1]
    eps = float(np.finfo(np.float32).eps)
    for N, blocks in ((1, 1), (7, 3), (66, 5)):
        K = blocks * block
        weight = random_weights.gguf_weight(rng, ggml_type, N, K)
        dense = weight.dequantize(np.float64)
        np.testing.assert_array_equal(xp.embedding(weight, np.arange(N)), dense.astype(np.float32))
        for T in range(1, 9):
            x = rng.standard_normal((T, K)).astype(np.float32)
            got = xp.linear(x, Linear(weight))
            assert got.shape == (T, N)
            error = np.abs(got - x.astype(np.float64) @ dense.T)
            assert (error <= 4 * eps * (np.abs(x.astype(np.float64)) @ np.abs(dense.T))).all()


@pytest.mark.parametrize("ggml_type", [GGMLType(kind).name for kind in numba_kernels.GGUF_BLOCKS])
def test_gguf_prompt_matmul_on_awkward_shapes(xp, ggml_type):
    """Prompts (more than SMALL_BATCH tokens) take gguf_matmul: row counts around its 6-row panels and 48-row
    shares, token counts around its 32-token vectors, depths that are not whole PANEL_DEPTH passes. Each product
    is within the decode test's bound, 4 eps32 of sum_k |x_k w_k| (measured: at most 2.1 eps32, a 96-long row)."""
    rng = np.random.default_rng(100 + int(GGMLType[ggml_type]))
    block = numba_kernels.GGUF_BLOCKS[int(GGMLType[ggml_type])][1]
    eps = float(np.finfo(np.float32).eps)
    for N, blocks, T in ((1, 1, 9), (7, 3, 33), (53, 5, 40)):
        K = blocks * block
        weight = random_weights.gguf_weight(rng, ggml_type, N, K)
        dense = weight.dequantize(np.float64)
        x = rng.standard_normal((T, K)).astype(np.float32)
        got = xp.linear(x, Linear(weight))
        assert got.shape == (T, N)
        error = np.abs(got - x.astype(np.float64) @ dense.T)
        assert (error <= 4 * eps * (np.abs(x.astype(np.float64)) @ np.abs(dense.T))).all()


def test_aligned_scratch_starts_on_a_cache_line():
    """The prompt microkernel's scratch (`aligned_empty`) starts on a 64-byte boundary whatever the allocator gives
    (Numba aligns to 32 bytes), C-contiguous, of the shape asked for, for sizes around the padding."""
    for rows, cols in ((1, 16), (3, 32), (576, 128), (1536, 160), (7, 0)):
        for _ in range(4):
            a = numba_kernels.aligned_empty(rows, cols)
            assert a.shape == (rows, cols) and a.dtype == np.float32 and a.flags.c_contiguous
            assert a.ctypes.data % 64 == 0


def test_copied_and_mapped_weights_run_one_compiled_kernel(xp):
    """The backend passes every weight read-only, as memory-mapped ones are, so a weight the load copied or
    converted (GGUF's reordered q/k rows, a dequantized table) runs the kernel compiled for the mapped ones instead
    of compiling a second specialisation (float_matmuls: ~3 s cold). (<1 s with the kernels cached.)"""
    x = np.ones((1, 64), np.float32)
    mapped_w, mapped_norm = np.ones((8, 64), np.float32), np.ones(64, np.float32)
    mapped_raw = np.zeros((8, 40), np.uint8)
    for a in (mapped_w, mapped_norm, mapped_raw):
        a.flags.writeable = False

    def run(w, norm, raw):
        xp.linear(x, Linear(w))
        xp.rms_norm(x, norm, 1e-5)
        xp.linear(x, Linear(GGUFBlockWeight(raw, GGMLType.Q4_1, (8, 64))))  # 2 blocks of 20 bytes a row

    kernels = (numba_kernels.float_matmuls, numba_kernels.rms_norm, numba_kernels._blocks_matvec)
    run(mapped_w, mapped_norm, mapped_raw)
    compiled = [set(k.signatures) for k in kernels]
    run(mapped_w.copy(), mapped_norm.copy(), mapped_raw.copy())
    assert [set(k.signatures) for k in kernels] == compiled


def test_rope_runs_one_compiled_kernel_for_decode_steps_and_prompts(xp):
    """apply_rope hands the kernel the (B, T, H, D) memory behind the model's (B, H, T, D) views, so one token (whose
    transposed views NumPy calls C-contiguous) and several run one specialisation, bit for bit as the reference.
    (<0.1 s with the kernel cached.)"""
    rng = np.random.default_rng(5)
    compiled = None
    for T in (1, 5):
        q = xp.split_heads(rng.standard_normal((2, T, 4 * 16)).astype(np.float32), 4)  # (2, 4, T, 16) view
        angles = rng.uniform(-50, 50, (2, 1, T, 8))
        cos, sin = (f(np.concatenate([angles, angles], axis=-1)).astype(np.float32) for f in (np.cos, np.sin))
        np.testing.assert_array_equal(xp.apply_rope(q, cos, sin), ops.apply_rope(q, cos, sin))
        compiled = compiled or set(numba_kernels.rope.signatures)
    assert set(numba_kernels.rope.signatures) == compiled


# ---------------------------------------------------------------- several Linears of one input in one kernel


def _counting(monkeypatch, name: str) -> list[int]:
    """Count the calls of numba_kernels.<name> from here on."""
    calls, kernel = [], getattr(numba_kernels, name)
    monkeypatch.setattr(numba_kernels, name, lambda *args: calls.append(1) or kernel(*args))
    return calls


def _linears_calls(xp, monkeypatch, x: np.ndarray, group: list[Linear], kernel: str) -> int:
    """Run xp.linears(x, group), check each result bit for bit against that layer's own `linear`, and return how
    many times numba_kernels.<kernel> ran for the group."""
    expected = [xp.linear(x, layer) for layer in group]
    calls = _counting(monkeypatch, kernel)
    got = xp.linears(x, group)
    monkeypatch.undo()
    for out, want in zip(got, expected, strict=True):
        np.testing.assert_array_equal(out, want)
    return len(calls)


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 20])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
def test_float_linears_run_as_one_kernel_with_the_separate_results(xp, monkeypatch, dtype, M):
    """q/k/v (three weights, one with a bias, odd K, row counts not a multiple of 4) and gate/up (two) go through
    one float_matmuls call each, with the results of separate `linear` calls bit for bit (the same dot products
    per row). (~1 s)"""
    rng = np.random.default_rng(M)
    K = 77
    layers = [Linear(rng.standard_normal((N, K)).astype(dtype), rng.standard_normal(N).astype(np.float32)
                     if N == 6 else None) for N in (13, 6, 6)]
    x = rng.standard_normal((1, M, K)).astype(np.float32)
    for group in (layers, layers[1:]):
        assert _linears_calls(xp, monkeypatch, x, group, "float_matmuls") == 1


@pytest.mark.parametrize("M", [1, 2, 5, 8, 9, 40])
def test_gguf_linears_run_as_one_kernel_with_the_separate_results(xp, monkeypatch, M):
    """Linears of one input in GGUF blocks, each its own type (Q4_K_M files mix Q5_0 and Q8_0 in q/k/v, Q4_K
    and Q6_K in gate/up), go through one kernel call with the results of separate `linear` calls bit for bit: up
    to SMALL_BATCH tokens gguf_matvecs when every type has 32-element blocks (a group with a K-quant runs one
    Linear at a time), more tokens gguf_matmuls (row counts across its 48-row shares). (~2 s)"""
    rng = np.random.default_rng(M)
    K = 96  # 3 blocks per row
    names = ["Q5_0", "Q8_0", "Q4_1", "Q4_0", "Q5_1"]
    weights = [random_weights.gguf_weight(rng, name, N, K) for name, N in zip(names, (53, 6, 49, 5, 9), strict=True)]
    x = rng.standard_normal((1, M, K)).astype(np.float32)
    kernel = "gguf_matvecs" if M <= SMALL_BATCH else "gguf_matmuls"
    for group in ([Linear(weights[0], rng.standard_normal(53).astype(np.float32)), Linear(weights[1]),
                   Linear(weights[2])], [Linear(w) for w in weights[3:]]):
        assert _linears_calls(xp, monkeypatch, x, group, kernel) == 1
    with_kquant = [Linear(random_weights.gguf_weight(rng, name, N, 256)) for name, N in (("Q8_0", 5), ("Q4_K", 50))]
    x = rng.standard_normal((1, M, 256)).astype(np.float32)
    assert _linears_calls(xp, monkeypatch, x, with_kquant, "gguf_matvecs") == 0
    assert _linears_calls(xp, monkeypatch, x, with_kquant, "gguf_matmuls") == (M > SMALL_BATCH)


def test_linears_plan_follows_the_group_and_goes_with_its_first_weight(xp):
    """`linears` keeps how it runs a group of quantized weights with the group's first weight: another group with
    the same first weight gets its own plan and results, and the plan goes when that weight does. (~0.1 s)"""
    import gc

    rng = np.random.default_rng(11)
    first, second, kquant = (random_weights.gguf_weight(rng, name, N, 256)
                             for name, N in (("Q8_0", 6), ("Q4_0", 5), ("Q4_K", 4)))
    x = rng.standard_normal((1, 1, 256)).astype(np.float32)
    before = len(xp._groups)
    for group in ([first, second], [first, kquant], [first, second]):
        layers = [Linear(w) for w in group]
        for got, layer in zip(xp.linears(x, layers), layers, strict=True):
            np.testing.assert_array_equal(got, xp.linear(x, layer))
        assert xp._groups[first].decode == ("gguf_matvecs" if group[1] is second else "")
    assert len(xp._groups) == before + 1
    del first, group, layers
    gc.collect()
    assert len(xp._groups) == before


# ---------------------------------------------------------------- GGUF blocks the kernels do not read


def test_unsupported_block_types_raise(xp):
    weight = GGUFBlockWeight(np.zeros((1, 84), np.uint8), GGMLType.Q2_K, (1, 256))
    with pytest.raises(BackendError, match="Q2_K"):
        xp.linear(np.ones((1, 32), np.float32), Linear(weight))


# ---------------------------------------------------------------- threads and the kernel cache


def test_thread_count_from_the_environment(monkeypatch):
    from refllama.backends import numba_backend

    monkeypatch.setenv("REFLLAMA_NUM_THREADS", "1")
    assert numba_backend.thread_count() == 1
    monkeypatch.delenv("REFLLAMA_NUM_THREADS")
    cap = numba_kernels.numba.config.NUMBA_NUM_THREADS
    assert numba_backend.thread_count() == min(len(os.sched_getaffinity(0)), cap)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # e.g. `taskset -c 0`: one CPU to run on
    assert numba_backend.thread_count() == 1
    for bad in ("0", "two"):
        monkeypatch.setenv("REFLLAMA_NUM_THREADS", bad)
        with pytest.raises(BackendError, match="REFLLAMA_NUM_THREADS"):
            numba_backend.thread_count()


def test_fewer_threads_while_other_work_holds_our_cpus(monkeypatch):
    """A low CPU share starts a trial of fewer threads, kept only while measured faster: a busy core (fewer
    threads win: kept, probes of all threads lose, until the machine is quiet again) and a host taking time from
    every vCPU (the share is low but all threads still win: the trial loses, and the next waits PROBE_EVERY
    passes). Passes of another token count judge nothing. (~0.1 s)"""
    from refllama.backends import numba_backend
    from refllama.backends.numba_backend import LOW_PASSES, PROBE_EVERY, threads_for_share

    assert threads_for_share(2, 0.99) == 2  # a quiet machine: every thread ran all the time
    assert threads_for_share(2, 0.64) == 1  # one core busy elsewhere (measured: 0.64)
    assert threads_for_share(16, 0.5) == 8
    assert threads_for_share(16, 0.9) == 16
    assert threads_for_share(2, 0.0) == 1

    # The backend on a fake clock: a pass on n threads takes seconds[n == full] of wall time, and process CPU time
    # grows by wall x threads, times `share` on all threads.
    clock = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(numba_backend.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(numba_backend.time, "process_time", lambda: clock["cpu"])
    monkeypatch.delenv("REFLLAMA_NUM_THREADS", raising=False)
    backend = get_backend("numba")
    if backend.threads < 2:
        pytest.skip("one usable CPU: nothing to adapt")
    full = backend.threads
    fewer = max(1, int(0.6 * full))

    def steps(n: int, share: float, full_s: float, fewer_s: float, tokens: int = 1) -> list[int]:
        used = []
        for _ in range(n):
            threads = backend.forward_threads(tokens)
            seconds = full_s if threads == full else fewer_s
            clock["wall"] += seconds
            clock["cpu"] += seconds * threads * (share if threads == full else 1.0)
            used.append(threads)
        return used

    assert steps(3, 1.0, 0.01, 0.02) == [full] * 3  # quiet
    # Busy: two low passes, then a trial of fewer threads, which runs faster and stays.
    assert steps(LOW_PASSES + 2, 0.6, 0.02, 0.01) == [full] * LOW_PASSES + [fewer] * 2
    used = steps(PROBE_EVERY + 2, 0.6, 0.02, 0.01)
    assert used[PROBE_EVERY - 1] == full and used.count(full) == 1  # a probe of all threads loses
    # Quiet again: the next probe wins and all threads stay.
    used = steps(PROBE_EVERY + 4, 1.0, 0.005, 0.01)
    first = used.index(full)
    assert used[first:] == [full] * (len(used) - first)
    # A host taking time from every vCPU: a low share, but all threads are faster. The trial loses, and the next
    # trial waits PROBE_EVERY passes.
    used = steps(LOW_PASSES + PROBE_EVERY + LOW_PASSES + 3, 0.7, 0.01, 0.014)
    assert used.count(fewer) == 2 and used[LOW_PASSES] == fewer
    assert used.index(fewer, LOW_PASSES + 1) == 2 * LOW_PASSES + 1 + PROBE_EVERY
    # A pass of another token count (a new prompt) judges nothing: a trial pending goes back.
    steps(PROBE_EVERY, 1.0, 0.01, 0.02)
    assert steps(LOW_PASSES + 1, 0.6, 0.02, 0.01) == [full] * LOW_PASSES + [fewer]
    assert steps(1, 1.0, 0.2, 0.2, tokens=40) == [full]
    monkeypatch.setenv("REFLLAMA_NUM_THREADS", "2")
    cap = numba_kernels.numba.config.NUMBA_NUM_THREADS
    assert get_backend("numba").forward_threads() == min(2, cap)  # an explicit count is kept whatever happens


def test_compiled_kernels_are_cached_outside_the_sources():
    cache = Path(numba_kernels.numba.config.CACHE_DIR).resolve()
    sources = Path(numba_kernels.__file__).resolve().parent
    assert cache == Path(numba_kernels.cache_dir()).resolve()
    assert sources != cache and sources not in cache.parents


def test_compiling_shows_a_status_and_the_cached_run_does_not(tmp_path):
    """A compile (empty cache) says so on stderr, once, in plain text when stderr is not a terminal; a second
    process that loads the kernel from the cache says nothing. (~5 s: one small kernel compiled.)"""
    script = ("import numpy as np\n"
              "from refllama.backends import numba_kernels as k, numba_progress\n"
              "x = np.ones((2, 8), np.float32)\n"
              "k.silu_mul(x, x, np.empty_like(x))\n"
              "print(numba_progress.compiled_count())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "REFLLAMA_QUIET")}
    env["NUMBA_CACHE_DIR"] = str(tmp_path)
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
            for _ in range(2)]
    assert runs[0].stdout.split() == ["1"] and runs[0].stderr.count("compiling kernels (first run only)") == 1
    assert runs[1].stdout.split() == ["0"] and "compiling" not in runs[1].stderr


def test_a_helper_process_compiles_the_attention_kernels_into_the_cache(tmp_path):
    """numba_helper in its own process compiles a kernel into an empty cache and says so; a second process finds
    it cached (and not the one the helper was not asked for), and its warm-up call for the backend's argument
    types loads it without compiling. (~5 s: the decode attention kernel compiled.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "REFLLAMA_QUIET")}
    env["NUMBA_CACHE_DIR"] = str(tmp_path)
    helper = subprocess.run([sys.executable, "-m", "refllama.backends.numba_helper", "attention"],
                            capture_output=True, text=True, env=env, check=True)
    assert helper.stdout.splitlines() == ["start attention", "done attention"]
    script = ("from refllama.backends import numba_gemm, numba_helper, numba_kernels, numba_progress\n"
              "cached = numba_helper._cached\n"
              "print(cached(numba_kernels.attention), cached(numba_gemm.prompt_attention))\n"
              "numba_kernels.warm_attention()\n"
              "print(numba_progress.compiled_count())\n")
    later = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert later.stdout.split() == ["True", "False", "0"]


def test_the_helper_starts_for_missing_kernels_only_and_its_end_releases_every_wait(monkeypatch):
    """No helper when every kernel is cached, on one usable CPU, or with REFLLAMA_COMPILE_HELPER=0. A helper that
    ends without compiling a kernel (here: one it does not know) releases the wait for it, so the backend
    compiles it itself. (~2 s: a Python process that imports Numba)"""
    from refllama.backends import numba_helper

    monkeypatch.setattr(numba_helper, "_STARTED", [])
    monkeypatch.setenv("REFLLAMA_COMPILE_HELPER", "0")
    monkeypatch.setattr(numba_helper, "_cached", lambda dispatcher: False)
    assert numba_helper.start(2) is None
    monkeypatch.delenv("REFLLAMA_COMPILE_HELPER")
    monkeypatch.setattr(numba_helper, "_cached", lambda dispatcher: True)
    assert numba_helper.start(2) is None
    monkeypatch.setattr(numba_helper, "_cached", lambda dispatcher: False)
    assert numba_helper.start(1) is None  # one usable CPU: the two processes would take turns
    helper = numba_helper.Helper(["no_such_kernel"])
    try:
        helper.process.wait(60)
        helper._reader.join(10)
        assert helper.wait("no_such_kernel") is True
        assert helper.process.returncode != 0
    finally:
        helper.stop()


def test_compile_reports_go_to_a_front_ends_reporter():
    from numba.core import event

    from refllama.backends import numba_progress

    reports = []
    previous = numba_progress.set_reporter(lambda done, name: reports.append((done, name)))
    try:
        before = numba_progress.compiled_count()
        data = {"dispatcher": numba_kernels.rms_norm}
        for status in (event.EventStatus.START, event.EventStatus.END):
            event.broadcast(event.Event("numba:compile", status, data=data))
    finally:
        numba_progress.set_reporter(previous)
    assert reports == [(before, "rms_norm")] and numba_progress.compiled_count() == before + 1


# ---------------------------------------------------------------- SmolLM2 from its Q4_1 GGUF, read as blocks


@pytest.fixture(scope="module")
def smollm2():
    return refllama.load(smollm2_path(), backend="numba"), load_npz(GOLDEN / "smollm2.npz")


def test_smollm2_keeps_its_blocks_as_stored(smollm2):
    engine, _ = smollm2
    weights = engine.model.weights
    up = weights.layers[0].mlp.up_proj.weight
    assert isinstance(up, GGUFBlockWeight) and up.ggml_type is GGMLType.Q4_1
    assert up.raw.dtype == np.uint8 and not up.raw.flags.writeable  # the file's bytes, read-only
    np.testing.assert_array_equal(up.raw, GGUFFile(smollm2_path()).raw("blk.0.ffn_up.weight").reshape(up.raw.shape))
    assert isinstance(weights.embeddings, GGUFBlockWeight) and weights.embeddings.ggml_type is GGMLType.Q8_0
    numpy_engine = refllama.load(smollm2_path(), backend="numpy")  # the numpy backend still dequantizes at load
    assert numpy_engine.model.weights.layers[0].mlp.up_proj.weight.dtype == np.float32


@pytest.mark.parametrize("prompt", ["chat", "paragraph", "code", "unicode"])
def test_smollm2_float32_logits_match_hf(smollm2, prompt):
    engine, g = smollm2
    assert_smollm2_logits(engine.logits(g[f"{prompt}_ids"]), g, prompt)


def test_smollm2_greedy_continuation_matches_hf(smollm2):
    engine, g = smollm2
    assert engine.generate_ids(g["chat_ids"], 32) == g["chat_greedy_f32"].tolist()


def test_smollm2_cached_decoding_through_the_fused_kernels(smollm2):
    """Decode steps (one token: the fused Q4_1/Q8_0 matvec) against HF's logits of the full sequence."""
    engine, g = smollm2
    logits = decode_rows(engine, g["code_ids"], prefill=40)
    top_ids = g["code_topk_ids"].astype(np.int64)
    np.testing.assert_allclose(np.take_along_axis(logits, top_ids, -1), g["code_topk_f32"], rtol=0,
                               atol=SMOLLM2_ATOL)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux's /proc")
def test_q4_1_gguf_peak_rss_is_about_its_file_size():
    """The target bound: the model's peak RSS, loading (`refllama.load`, its tokenizer checked) and generating from
    the Q4_1 GGUF on token ids, <= 1.3 x file size + KV cache. Counted in a fresh process from its RSS once the
    interpreter, NumPy and the compiled kernels are in, as tools/bench.py counts it. The tokenizer is built by its
    library only on first use (about 15 MB more; an engine handed token ids never builds it)."""
    path = smollm2_path()
    script = (
        "import numpy as np\n"
        "import refllama\n"
        "from refllama.backends import get_backend, numba_kernels\n"
        "get_backend('numba')\n"
        "numba_kernels.warm_up()\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS\n"
        "status = lambda key: int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(key)))\n"
        "base = status('VmRSS:')\n"
        f"engine = refllama.load({str(path)!r}, backend='numba', dtype='float32')\n"
        "assert engine.tokenizer is not None\n"
        "engine.generate_ids(np.arange(100, 164), 64, stop_at_eos=False)\n"
        "print(base, status('VmHWM:'))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    base_kb, peak_kb = map(int, out.stdout.split()[-2:])
    c = config_from_gguf(GGUFFile(path))
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * 128 * c.head_dim * 4
    assert (peak_kb - base_kb) * 1024 <= 1.3 * path.stat().st_size + kv_bytes
