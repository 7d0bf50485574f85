"""The numba backend: each kernel against the numpy reference, then end to end against HF (golden/).

Bounds (measured values in docs/numba.md):
* exact (bit for bit against the numpy backend): W8A8 (activation codes, int32 accumulators, epilogue, both
  semantics), the dequantization of every supported weight format (GGUF Q4_0/Q4_1/Q8_0/Q4_K/Q6_K, int8 and
  1..8-bit packed codes with groups, zero points and act-order), embedding rows from GGUF blocks, RoPE, GELU/ReLU.
* matmuls (float weights, and quantized ones against their reference dequantization), compared with x @ W.T in
  float64: |ours - exact| <= 2 K eps32 (|x| @ |W|.T) elementwise, twice the worst-case rounding of a K-term float32
  dot product in any order (measured <= 2.6e-4 of that).
* RMSNorm, attention, SiLU-mul against the numpy backend: <= 8 eps32 max|ref|, as the mlx backend's tests
  (measured 1.0, 1.8, 0.2 eps32).
* fixtures against HF float32: the numpy backend's bounds (2e-5, argmax where the top-1/top-2 margin exceeds 1e-3,
  identical greedy continuations); SmolLM2 from its Q4_1 GGUF, read as blocks: 2e-4 (tests/test_smollm2.py);
  the quantized fixtures: their numpy bounds (tests/test_quant_fixtures.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import refllama
from refllama.backends import get_backend
from refllama.config import ActivationType, LlamaConfig
from refllama.errors import BackendError
from refllama.formats import ggml_quants
from refllama.formats.checkpoint import load_weight_map
from refllama.formats.ggml_quants import GGMLType
from refllama.formats.gguf import GGUFFile
from refllama.formats.gguf_llama import config_from_gguf
from refllama.formats.safetensors import TensorSource
from refllama.model.weights import Linear
from refllama.quant import ActivationQuant, Int8Weight, PackedIntWeight
from refllama.quant.gguf_blocks import GGUFBlockWeight
from refllama.quant.packing import pack_rows

from conftest import (
    F32_ATOL,
    FIXTURE_NAMES,
    GOLDEN,
    LENGTHS,
    QUANT,
    QUANT_NAMES,
    SMOLLM2_ATOL,
    assert_close,
    assert_smollm2_logits,
    decode_rows,
    engine_cache,
    golden,
    load_npz,
    quant_engine,
    quant_golden,
    smollm2_path,
)
from test_quant_fixtures import W8A8_HF_ATOL, W8A8_HF_TOP1, reference_key

pytest.importorskip("numba")

from refllama.backends import numba_kernels

EPS32 = float(np.finfo(np.float32).eps)
BF16 = np.dtype(ml_dtypes.bfloat16)
BLOCK_TYPES = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K]


@pytest.fixture(scope="module")
def xp():
    return get_backend("numba", "float32")


@pytest.fixture(scope="module")
def ref():
    return get_backend("numpy", "float32")


def _matmul_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """2 K eps32 (|x| @ |W|.T): twice the worst-case float32 rounding of one K-term dot product, any order."""
    K = x.shape[-1]
    return 2 * K * EPS32 * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T) + 1e-30


def _check_matmul(xp, x: np.ndarray, layer: Linear, dense: np.ndarray) -> None:
    """The numba backend's linear against x @ dense.T + bias in float64, within the summation-order bound."""
    got = xp.linear(x, layer)
    expected = x.astype(np.float64) @ dense.astype(np.float64).T
    if layer.bias is not None:
        expected += layer.bias
    assert got.dtype == np.float32 and got.shape == expected.shape
    bound = _matmul_bound(x.reshape(-1, x.shape[-1]), dense).reshape(expected.shape) + 2 * EPS32 * np.abs(expected)
    assert np.all(np.abs(got - expected) <= bound)


def _identity_rows(xp, layer: Linear, K: int) -> np.ndarray:
    """W itself, through the backend's matmul: x = I (K tokens, more than the decode batch) gives W.T exactly."""
    return xp.linear(np.eye(K, dtype=np.float32), layer).T


# ---------------------------------------------------------------- float matmul


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 5, 7), (3, 8, 64), (5, 9, 100), (9, 4, 33), (13, 7, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_float_linear(xp, M, N, K, bias):
    rng = np.random.default_rng(M * 100 + N * 10 + K)
    x = rng.standard_normal((1, M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    _check_matmul(xp, x, Linear(w, b), w)


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


def test_bfloat16_checkpoint_stays_memory_mapped(xp):
    """Loading a bfloat16 folder keeps its matrices as the file's mapped bytes (vectors become float32), and the
    logits are bit for bit those of the same backend on the weights converted to float32 first."""
    folder = QUANT / "tiny-llama-bf16"
    engine = refllama.load(folder, backend="numba")
    weights = engine.model.weights
    gate = weights.layers[0].mlp.gate_proj.weight
    assert gate.dtype == BF16 and not gate.flags.owndata
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


# ---------------------------------------------------------------- W8A8: exact


def _w8a8_weight(rng, N: int, K: int, semantics: str, per_tensor: bool = False) -> Int8Weight:
    q = rng.integers(-128, 128, (N, K), dtype=np.int8)
    scale = rng.uniform(1e-3, 2e-2, (1, 1) if per_tensor else (N, 1)).astype(np.float32)
    return Int8Weight(q, scale, activation=ActivationQuant(semantics))


@pytest.mark.parametrize("semantics", ["hf", "vllm"])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 3, 33), (2, 4, 100), (5, 9, 576), (12, 6, 1536)])
def test_w8a8_is_bit_for_bit_the_reference(xp, ref, semantics, M, N, K):
    rng = np.random.default_rng(M + N + K)
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 10, (M, 1))).astype(np.float32)
    x[0, rng.integers(K)] = -np.abs(x[0]).max() * 1.5  # a negative absmax: the -127.5 tie of the "hf" formula
    if M > 1:
        x[1] = 0  # an all-zero token
    for per_tensor in (False, True):
        layer = Linear(_w8a8_weight(rng, N, K, semantics, per_tensor), rng.standard_normal(N).astype(np.float32))
        np.testing.assert_array_equal(xp.linear(x[None], layer), ref.linear(x[None], layer))


def test_w8a8_accumulators_reach_the_int32_extremes_exactly(xp, ref):
    K = 4096  # 4096 * 128 * 128 = 2**26 per accumulator: far past float32's 2**24, well inside int32
    x = np.full((1, K), -1.0, np.float32)  # codes all -128 ("hf": -1 / (1 / 127.5) = -127.5 -> -128)
    q = np.full((2, K), -128, np.int8)
    q[1, ::2] = 127
    layer = Linear(Int8Weight(q, np.ones((2, 1), np.float32), activation=ActivationQuant("hf")))
    np.testing.assert_array_equal(xp.linear(x, layer), ref.linear(x, layer))


def test_w8a8_rejects_overflowing_k(xp):
    K = 131072
    layer = Linear(Int8Weight(np.zeros((1, K), np.int8), np.ones((1, 1), np.float32),
                              activation=ActivationQuant("hf")))
    with pytest.raises(BackendError, match="overflows"):
        xp.linear(np.ones((1, K), np.float32), layer)


# ---------------------------------------------------------------- weight-only codes: exact dequantization


def _codes_weight(rng, N: int, K: int, bits: int, group_size: int | None, asym: bool, act_order: bool,
                  transposed: bool) -> Int8Weight | PackedIntWeight:
    """Random codes, bf16-like scales and zero points, in the layouts the quantization loader builds."""
    G = 1 if group_size is None else -(-K // group_size)
    scale = (rng.uniform(0.5, 2, (N, G)) * 2.0 ** rng.integers(-8, -4, (N, G))).astype(np.float32)
    g_idx = rng.permutation(np.arange(K) // group_size).astype(np.int32) if act_order else None
    if bits == 8 and not transposed:
        q = rng.integers(-128, 128, (N, K), dtype=np.int8)
        zero = rng.integers(-20, 20, (N, G), dtype=np.int8) if asym else None
        return Int8Weight(q, scale, zero, group_size, g_idx)
    codes = rng.integers(0, 1 << bits, (N, K), dtype=np.uint8)
    packed = pack_rows(codes, bits)  # (N, words)
    if transposed:  # GPTQ's qweight.T: a strided view
        packed = np.ascontiguousarray(packed.T).T
    zero = rng.integers(0, 1 << bits, (N, G)).astype(np.int32) if asym else None
    return PackedIntWeight(packed, scale, bits, K, zero, group_size, g_idx)


CODE_CASES = [  # bits, group_size, asym, act_order, transposed
    (8, None, False, False, False), (8, 32, True, False, False), (8, 32, False, True, False),
    (4, 32, False, False, False), (4, 32, True, False, False), (4, 32, False, True, True), (4, None, True, False, True),
    (2, 16, True, False, False), (3, 32, True, False, False), (5, 64, False, False, False),
    (6, None, False, False, False), (7, 32, True, True, False), (8, 32, True, False, True),
]


@pytest.mark.parametrize("bits,group_size,asym,act_order,transposed", CODE_CASES)
@pytest.mark.parametrize("N,K", [(1, 100), (7, 64), (9, 200)])
def test_weight_only_codes(xp, bits, group_size, asym, act_order, transposed, N, K):
    """Dequantized exactly (K = 100, 200: the last group is partial); decode and prefill within the float bound."""
    from refllama.quant.types import dequantize

    rng = np.random.default_rng(bits * 1000 + K + N)
    weight = _codes_weight(rng, N, K, bits, group_size, asym, act_order, transposed)
    dense = dequantize(weight)
    layer = Linear(weight)
    np.testing.assert_array_equal(_identity_rows(xp, layer, K), dense)
    for M in (1, 3, 12):
        _check_matmul(xp, rng.standard_normal((M, K)).astype(np.float32), layer, dense)


# ---------------------------------------------------------------- GGUF blocks: exact dequantization


def _gguf_weight(rng, ggml_type: GGMLType, N: int, K: int) -> GGUFBlockWeight:
    """Random blocks: random code bytes, finite fp16 scales (and mins) of realistic size."""
    block, size = ggml_quants.BLOCK_SIZES[ggml_type]
    raw = rng.integers(0, 256, (N, K // block, size), dtype=np.uint8)

    def f16(shape):
        return (rng.standard_normal(shape) * 0.02).astype("<f2").view(np.uint8).reshape(*shape[:2], 2)

    fields = {GGMLType.Q4_0: [0], GGMLType.Q4_1: [0, 2], GGMLType.Q8_0: [0], GGMLType.Q4_K: [0, 2],
              GGMLType.Q6_K: [208]}[ggml_type]
    for offset in fields:
        raw[:, :, offset:offset + 2] = f16((N, K // block))
    return GGUFBlockWeight(raw.reshape(N, -1), ggml_type, (N, K))


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES)
@pytest.mark.parametrize("N,K", [(1, 256), (5, 512), (8, 768)])
def test_gguf_blocks(xp, ggml_type, N, K):
    from refllama.quant.gguf_blocks import dequantize

    rng = np.random.default_rng(int(ggml_type) * 100 + N)
    weight = _gguf_weight(rng, ggml_type, N, K)
    dense = dequantize(weight)
    layer = Linear(weight, rng.standard_normal(N).astype(np.float32))
    np.testing.assert_array_equal(_identity_rows(xp, Linear(weight), K), dense)
    for M in (1, 2, 8, 9):  # fused matvec up to 8 tokens, dequantized blocks beyond
        _check_matmul(xp, rng.standard_normal((1, M, K)).astype(np.float32), layer, dense)


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES)
def test_embedding_rows_from_blocks_are_exact(xp, ggml_type):
    from refllama.quant.gguf_blocks import dequantize

    weight = _gguf_weight(np.random.default_rng(3), ggml_type, 11, 256)
    ids = np.array([[0, 10, 3, 3], [7, 1, 0, 9]])
    np.testing.assert_array_equal(xp.embedding(weight, ids), dequantize(weight)[ids])


def test_unsupported_block_types_raise(xp):
    weight = GGUFBlockWeight(np.zeros((1, 22), np.uint8), GGMLType.Q5_0, (1, 32))
    with pytest.raises(BackendError, match="Q5_0"):
        xp.linear(np.ones((1, 32), np.float32), Linear(weight))


# ---------------------------------------------------------------- the other ops


def _close(got: np.ndarray, expected: np.ndarray, factor: float = 8) -> None:
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=factor * EPS32 * np.abs(expected).max())


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 96), (2, 7, 576)])
def test_rms_norm(xp, ref, shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    _close(xp.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("T", [1, 5])
def test_rope_is_exact_on_strided_views(xp, ref, T):
    rng = np.random.default_rng(T)
    q = rng.standard_normal((2, T, 6, 32)).astype(np.float32).transpose(0, 2, 1, 3)  # as the model passes it
    angles = rng.uniform(-50, 50, (2, 1, T, 16))
    angles = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    np.testing.assert_array_equal(xp.apply_rope(q, cos, sin), ref.apply_rope(q, cos, sin))


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 3), (8, 1)])
@pytest.mark.parametrize("T,past", [(1, 0), (1, 7), (5, 0), (5, 4)])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_attention_gqa_and_masks(xp, ref, heads, T, past, head_dim):
    """Causal masks with padding, including fully masked rows (padding queries), which stay finite; K/V as the
    cache hands them over (leading slices of a larger buffer) and as plain arrays."""
    H, KV = heads
    B, S = 2, past + T
    rng = np.random.default_rng(H * 100 + T * 10 + past)
    q = rng.standard_normal((B, T, H, head_dim)).astype(np.float32).transpose(0, 2, 1, 3)
    buffers = rng.standard_normal((2, B, KV, S + 6, head_dim)).astype(np.float32)
    k, v = buffers[0][:, :, :S], buffers[1][:, :, :S]
    mask = np.broadcast_to(np.arange(S)[None, :] <= (past + np.arange(T))[:, None], (B, T, S)).copy()
    mask[1, :, : S // 2 + 1] = False  # row 1 is left-padded: its first queries see nothing at all
    for keys, values in ((k, v), (np.ascontiguousarray(k), np.ascontiguousarray(v)), (k[:, :, ::-1], v[::-1])):
        got = xp.attention(q, keys, values, mask)
        assert np.isfinite(got).all()
        _close(got, ref.attention(q, keys, values, mask))


@pytest.mark.parametrize("act", list(ActivationType))
@pytest.mark.parametrize("shape", [(1, 1), (3, 200)])
def test_gated_activation(xp, ref, act, shape):
    rng = np.random.default_rng(4)
    gate = (rng.standard_normal(shape) * 3).astype(np.float32)
    up = rng.standard_normal(shape).astype(np.float32)
    got, expected = xp.gated_activation(gate, up, act), ref.gated_activation(gate, up, act)
    if act in (ActivationType.Silu, ActivationType.Swish):
        _close(got, expected)
    else:
        np.testing.assert_array_equal(got, expected)


def test_float64_is_not_offered():
    with pytest.raises(BackendError, match="numba backend computes in float32"):
        get_backend("numba", "float64")


def test_thread_count_from_the_environment(monkeypatch):
    from refllama.backends import numba_backend

    monkeypatch.setenv("REFLLAMA_NUM_THREADS", "1")
    assert numba_backend.thread_count() == 1
    monkeypatch.delenv("REFLLAMA_NUM_THREADS")
    assert numba_backend.thread_count() == min(2, numba_kernels.numba.config.NUMBA_NUM_THREADS)
    for bad in ("0", "two"):
        monkeypatch.setenv("REFLLAMA_NUM_THREADS", bad)
        with pytest.raises(BackendError, match="REFLLAMA_NUM_THREADS"):
            numba_backend.thread_count()


def test_compiled_kernels_are_cached_outside_the_sources():
    cache = Path(numba_kernels.numba.config.CACHE_DIR).resolve()
    sources = Path(numba_kernels.__file__).resolve().parent
    assert cache == Path(numba_kernels.cache_dir()).resolve()
    assert sources != cache and sources not in cache.parents


# ---------------------------------------------------------------- golden files (HF float32)


@pytest.fixture(scope="module")
def engines():
    return engine_cache("numba")


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixtures_match_hf_float32(engines, name):
    g = golden(name)
    engine = engines(name)
    for length in LENGTHS:
        ours = engine.logits(g[f"ids_{length}"])
        assert ours.dtype == np.float32
        assert_close(ours, g[f"logits_{length}_f32"], F32_ATOL)
    assert engine.generate_ids(g["ids_10"], max_new_tokens=16) == g["greedy_f32"].tolist()


def test_dynamic_ntk_cached_decoding_follows_hf_semantics(engines):
    g = golden("dynamic")
    engine = engines("dynamic")
    rows = decode_rows(engine, g[f"ids_{max(LENGTHS)}"], prefill=16)
    np.testing.assert_allclose(rows, g["cached_decode_f32"], rtol=0, atol=F32_ATOL)


@pytest.mark.parametrize("name", ["llama32", "sharded"])
def test_cached_decoding_equals_a_full_forward(engines, name):
    engine = engines(name)
    ids = np.random.default_rng(0).integers(0, 64, 30)
    full = engine.logits(ids)
    for cuts in ([1, 2, 3], [10, 11, 20], [29]):
        cache = engine.new_cache(1, len(ids) + 3)
        chunks = [engine.forward(piece[None], cache)[0] for piece in np.split(ids, cuts)]
        np.testing.assert_allclose(np.concatenate(chunks), full, rtol=0, atol=F32_ATOL)


def test_padded_batch_matches_single_sequences(engines):
    engine = engines("llama32")
    a, b = np.arange(3, 12), np.arange(20, 25)
    ids = np.zeros((2, len(a)), np.int64)
    ids[0], ids[1, len(a) - len(b):] = a, b
    mask = (np.arange(len(a))[None] >= np.array([[0], [len(a) - len(b)]])).astype(np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    out = engine.forward(ids, engine.new_cache(2, len(a)), attention_mask=mask, positions=positions)
    np.testing.assert_allclose(out[0], engine.logits(a), rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(out[1, len(a) - len(b):], engine.logits(b), rtol=0, atol=F32_ATOL)


# ---------------------------------------------------------------- quantized fixtures (tests/fixtures/quant/)


@pytest.mark.parametrize("name", [n for n in QUANT_NAMES if n != "tiny-w8a8"])
def test_quantized_fixtures_match_the_exact_function_of_the_checkpoint(name):
    g = quant_golden(name)
    engine = quant_engine(name, "numba")
    for prompt in ("a", "b"):
        assert_close(engine.logits(g[f"ids_{prompt}"]), g[reference_key(name, prompt)], F32_ATOL)


def test_w8a8_fixture_matches_its_references():
    """vLLM semantics (no rounding ties) within 2e-5 of their reference; compressed-tensors semantics within the
    -127.5 tie bound of tests/test_quant_fixtures.py."""
    g = quant_golden("tiny-w8a8")
    vllm, hf = quant_engine("tiny-w8a8", "numba", semantics="vllm"), quant_engine("tiny-w8a8", "numba")
    for prompt in ("a", "b"):
        ids = g[f"ids_{prompt}"]
        np.testing.assert_allclose(vllm.logits(ids), g[f"logits_{prompt}_int8vllm"], rtol=0, atol=F32_ATOL)
        ours, ref = hf.logits(ids), g[f"logits_{prompt}"]
        assert np.abs(ours - ref).max() < W8A8_HF_ATOL and (ours.argmax(-1) == ref.argmax(-1)).mean() >= W8A8_HF_TOP1


# ---------------------------------------------------------------- SmolLM2 from its Q4_1 GGUF, read as blocks


@pytest.fixture(scope="module")
def smollm2():
    return refllama.load(smollm2_path(), backend="numba"), load_npz(GOLDEN / "smollm2.npz")


def test_smollm2_keeps_its_blocks_memory_mapped(smollm2):
    engine, _ = smollm2
    weights = engine.model.weights
    up = weights.layers[0].mlp.up_proj.weight
    assert isinstance(up, GGUFBlockWeight) and up.ggml_type is GGMLType.Q4_1
    assert up.raw.dtype == np.uint8 and not up.raw.flags.owndata and not up.raw.flags.writeable  # the mapped file
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
    """The target bound: the model's peak RSS, loading and generating from the Q4_1 GGUF, <= 1.3 x file size +
    KV cache. Counted in a fresh process from its RSS once the interpreter, NumPy, the compiled kernels and the
    GGUF metadata (the config) are in; the tokenizer is not built (its Python objects take about 35 MB, which
    tools/bench.py's whole-process figure includes)."""
    path = smollm2_path()
    script = (
        "import numpy as np\n"
        "from refllama.backends import get_backend, numba_kernels\n"
        "from refllama.engine import GenericLlamaEngine\n"
        "from refllama.formats.gguf import GGUFFile\n"
        "from refllama.formats.gguf_llama import GGUFTensorSource, config_from_gguf\n"
        "from refllama.formats.checkpoint import load_weight_map\n"
        "from refllama.loading import stored_block_types\n"
        f"gguf = GGUFFile({str(path)!r})\n"
        "config, backend = config_from_gguf(gguf), get_backend('numba')\n"
        "numba_kernels.warm_up()\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS\n"
        "status = lambda key: int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith(key)))\n"
        "base = status('VmRSS:')\n"
        "source = GGUFTensorSource(gguf, config, stored_block_types(backend))\n"
        "engine = GenericLlamaEngine(config, load_weight_map(source, config), backend)\n"
        "engine.generate_ids(np.arange(100, 164), 64, stop_at_eos=False)\n"
        "print(base, status('VmHWM:'))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    base_kb, peak_kb = map(int, out.stdout.split()[-2:])
    c = config_from_gguf(GGUFFile(path))
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * 128 * c.head_dim * 4
    assert (peak_kb - base_kb) * 1024 <= 1.3 * path.stat().st_size + kv_bytes
