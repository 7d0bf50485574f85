"""The MLX backend: op by op against the numpy backend, end to end against HF (golden/), the KV cache, the graph.

Bounds (measured values in docs/mlx.md):
* ops, float32, against the numpy backend in float32 on the same inputs: |diff| <= 8 eps32 * max|ref|
  (measured <= 2.8 eps32, each backend's own rounding and summation order); gathers and writes exactly.
* ops, float16/bfloat16, against the numpy backend in float64 on the same (rounded) inputs: |diff| <= 2 eps * max|ref|
  of the half type (measured <= 0.76): the result is rounded once to the half type, and a few steps round an
  intermediate as HF does (RMSNorm casts before the weight; RoPE multiplies in the half type).
* fixtures, float32, against HF float32: the numpy backend's bounds (2e-5, argmax where the top-1/top-2 margin
  exceeds 1e-3, identical greedy continuations), measured <= 3.8e-6.
* fixtures, bfloat16 / float16 against HF float32: 0.1 / 0.015 (measured <= 0.066 / 0.0069, the same distance
  as HF's own bfloat16 / float16 runs; logits are of order 4).
* SmolLM2 float32 against HF float32: 2e-4, as tests/test_smollm2.py (measured <= 1.1e-4).
"""

from __future__ import annotations

import io

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refllama
from refllama.backends import get_backend
from refllama.config import ActivationType
from refllama.dtypes import DataType
from refllama.errors import BackendError
from refllama.model.weights import Linear

from conftest import (
    F32_ATOL,
    FIXTURE_NAMES,
    GOLDEN,
    HALF_ATOL,
    LENGTHS,
    assert_close,
    assert_smollm2_logits,
    decode_rows,
    engine_cache,
    golden,
    load_npz,
    smollm2_path,
)

mx = pytest.importorskip("mlx.core")

HALF_TYPES = [DataType.F16, DataType.BF16]


@pytest.fixture(scope="module")
def mlx_engines():
    return engine_cache("mlx")


# ---------------------------------------------------------------- op by op


class Ops:
    """The mlx backend in `dtype` and its reference: the numpy backend in float32 for float32, else in float64."""

    def __init__(self, dtype: DataType, seed: int = 0):
        self.mlx = get_backend("mlx", dtype)
        self.ref = get_backend("numpy", DataType.F32 if dtype is DataType.F32 else DataType.F64)
        self.np_dtype = dtype.numpy_dtype
        self.eps = float(ml_dtypes.finfo(self.np_dtype).eps)
        self.factor = 8 if dtype is DataType.F32 else 2
        self.rng = np.random.default_rng(seed)

    def inputs(self, *shape: int, scale: float = 1.0) -> tuple[mx.array, np.ndarray]:
        """The same random values, rounded to the compute dtype, for both backends."""
        host = (self.rng.standard_normal(shape) * scale).astype(self.np_dtype)
        return self.mlx.asarray(host), self.ref.asarray(host)

    def check(self, out: mx.array, expected: np.ndarray) -> None:
        got = self.mlx.to_numpy(out)
        assert got.dtype == self.np_dtype and got.shape == expected.shape
        atol = self.factor * self.eps * np.abs(expected).max()
        np.testing.assert_allclose(got.astype(np.float64), expected, rtol=0, atol=atol)


ALL_TYPES = [DataType.F32, *HALF_TYPES]


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear(dtype, bias):
    ops = Ops(dtype, seed=1)
    x, x_ref = ops.inputs(2, 7, 96, scale=2)
    w, w_ref = ops.inputs(80, 96, scale=0.1)
    b, b_ref = ops.inputs(80) if bias else (None, None)
    ops.check(ops.mlx.linear(x, Linear(w, b)), ops.ref.linear(x_ref, Linear(w_ref, b_ref)))


@pytest.mark.parametrize("dtype", ALL_TYPES)
def test_rms_norm(dtype):
    ops = Ops(dtype, seed=2)
    x, x_ref = ops.inputs(2, 7, 96, scale=3)
    w, w_ref = ops.inputs(96)
    ops.check(ops.mlx.rms_norm(x, w, 1e-5), ops.ref.rms_norm(x_ref, w_ref, 1e-5))


@pytest.mark.parametrize("dtype", ALL_TYPES)
def test_apply_rope(dtype):
    ops = Ops(dtype, seed=3)
    q, q_ref = ops.inputs(2, 6, 5, 32)
    angles = ops.rng.uniform(-50, 50, (2, 1, 5, 16))
    angles = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(angles).astype(ops.np_dtype), np.sin(angles).astype(ops.np_dtype)
    expected = ops.ref.apply_rope(q_ref, ops.ref.asarray(cos), ops.ref.asarray(sin))
    ops.check(ops.mlx.apply_rope(q, ops.mlx.asarray(cos), ops.mlx.asarray(sin)), expected)


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("act", list(ActivationType))
def test_gated_activation(dtype, act):
    ops = Ops(dtype, seed=4)
    gate, gate_ref = ops.inputs(3, 200, scale=3)
    up, up_ref = ops.inputs(3, 200)
    ops.check(ops.mlx.gated_activation(gate, up, act), ops.ref.gated_activation(gate_ref, up_ref, act))


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 3), (8, 1)])
@pytest.mark.parametrize("T,past", [(1, 0), (1, 7), (5, 0), (5, 4)])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_attention_gqa_and_masks(dtype, heads, T, past, head_dim):
    """Causal masks with padding, including fully masked rows (padding queries), which stay finite."""
    H, KV = heads
    B, S = 2, past + T
    ops = Ops(dtype, seed=H * 100 + T * 10 + past)
    q, q_ref = ops.inputs(B, H, T, head_dim)
    k, k_ref = ops.inputs(B, KV, S, head_dim)
    v, v_ref = ops.inputs(B, KV, S, head_dim)
    mask = np.broadcast_to(np.arange(S)[None, :] <= (past + np.arange(T))[:, None], (B, T, S)).copy()
    mask[1, :, : S // 2 + 1] = False  # row 1 is left-padded: its first queries see nothing at all
    expected = ops.ref.attention(q_ref, k_ref, v_ref, mask)
    out = ops.mlx.attention(q, k, v, ops.mlx.asarray(mask))
    assert np.isfinite(ops.mlx.to_numpy(out).astype(np.float64)).all()
    ops.check(out, expected)


def test_embedding_is_an_exact_gather():
    xp = get_backend("mlx", DataType.BF16)
    table = np.random.default_rng(5).standard_normal((50, 16)).astype(ml_dtypes.bfloat16)
    ids = np.random.default_rng(6).integers(0, 50, (2, 7))
    out = xp.to_numpy(xp.embedding(xp.asarray(table), xp.asarray(ids)))
    np.testing.assert_array_equal(out.view(np.uint16), table[ids].view(np.uint16))


@pytest.mark.parametrize("dtype", ALL_TYPES)
def test_asarray_rounds_once_on_the_host_and_keeps_integers(dtype, tmp_path):
    xp = get_backend("mlx", dtype)
    x64 = np.random.default_rng(7).standard_normal((4, 5))
    for source in (x64, x64.astype(ml_dtypes.bfloat16), x64.astype(np.float16), x64.T):
        a = xp.asarray(source)
        assert a.dtype == xp.mx_dtype
        np.testing.assert_array_equal(xp.to_numpy(a), np.asarray(source).astype(dtype.numpy_dtype))
    path = tmp_path / "weights.bin"
    x64.astype(np.float32).tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=(4, 5))  # read-only, as safetensors views are
    assert not mapped.flags.writeable
    np.testing.assert_array_equal(xp.to_numpy(xp.asarray(mapped)), np.asarray(mapped).astype(dtype.numpy_dtype))
    ids, mask = np.arange(6).reshape(2, 3), np.array([[True, False]])
    assert xp.asarray(ids).dtype == mx.int64 and xp.asarray(mask).dtype == mx.bool_
    np.testing.assert_array_equal(np.array(xp.asarray(ids)), ids)


def test_to_numpy_round_trips_bfloat16_bits():
    xp = get_backend("mlx", DataType.BF16)
    bits = np.arange(0, 2**16, 7, dtype=np.uint16)
    bits = bits[np.isfinite(bits.view(ml_dtypes.bfloat16).astype(np.float32))]
    out = xp.to_numpy(xp.asarray(bits.view(ml_dtypes.bfloat16)))
    assert out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out.view(np.uint16), bits)


def _address(a: mx.array) -> int:
    """Where an array's data lives (bytes: bfloat16 has no buffer format); the views are dropped at once."""
    return np.asarray(memoryview(a.view(mx.uint8))).__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", ALL_TYPES)
def test_zeros_and_cache_write(dtype):
    xp = get_backend("mlx", dtype)
    buffer = xp.zeros((2, 3, 10, 4))
    assert buffer.dtype == xp.mx_dtype and buffer.shape == (2, 3, 10, 4)
    expected = np.zeros((2, 3, 10, 4), dtype.numpy_dtype)
    np.testing.assert_array_equal(xp.to_numpy(buffer), expected)
    address = _address(buffer)
    for start, T in [(0, 3), (3, 1), (4, 5)]:
        values = np.random.default_rng(start).standard_normal((2, 3, T, 4)).astype(dtype.numpy_dtype)
        assert xp.cache_write(buffer, xp.asarray(values), start) is buffer
        expected[:, :, start:start + T] = values
        np.testing.assert_array_equal(xp.to_numpy(buffer), expected)
        assert _address(buffer) == address  # written in place, not copied


def test_float64_is_not_offered():
    with pytest.raises(BackendError, match="numpy backend computes in float64"):
        get_backend("mlx", "float64")


# ---------------------------------------------------------------- golden files (HF float32)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("length", LENGTHS)
def test_float32_matches_hf_float32(mlx_engines, name, length):
    g = golden(name)
    ours = mlx_engines(name).logits(g[f"ids_{length}"])
    assert ours.dtype == np.float32
    assert_close(ours, g[f"logits_{length}_f32"], F32_ATOL)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_greedy_continuation_matches_hf_generate(mlx_engines, name):
    g = golden(name)
    assert mlx_engines(name).generate_ids(g["ids_10"], max_new_tokens=16) == g["greedy_f32"].tolist()


def test_dynamic_ntk_cached_decoding_follows_hf_semantics(mlx_engines):
    """Past max_position_embeddings each cached key keeps the rotation it was written with, as in HF."""
    g = golden("dynamic")
    engine = mlx_engines("dynamic")
    rows = decode_rows(engine, g[f"ids_{max(LENGTHS)}"], prefill=16)
    np.testing.assert_allclose(rows, g["cached_decode_f32"], rtol=0, atol=F32_ATOL)


# ---------------------------------------------------------------- half precision end to end


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stays_close_to_float32(mlx_engines, name, dtype):
    g = golden(name)
    n = max(LENGTHS)
    ours = mlx_engines(name, dtype).logits(g[f"ids_{n}"])
    assert ours.dtype == np.dtype(DataType.parse(dtype).numpy_dtype)
    np.testing.assert_allclose(ours.astype(np.float32), g[f"logits_{n}_f32"], rtol=0, atol=HALF_ATOL[dtype])


def test_bfloat16_decodes_through_the_cache(mlx_engines):
    g = golden("llama32")
    engine = mlx_engines("llama32", "bfloat16")
    ids = g["ids_48"][:24]
    cached = decode_rows(engine, ids, prefill=8).astype(np.float32)
    np.testing.assert_allclose(cached, mlx_engines("llama32").logits(ids), rtol=0, atol=HALF_ATOL["bfloat16"])
    new = engine.generate_ids(g["ids_10"], max_new_tokens=16, stop_at_eos=False)
    assert len(new) == 16 and all(0 <= t < engine.config.vocab_size for t in new)


# ---------------------------------------------------------------- KV cache and the lazy graph


@st.composite
def cases(draw):
    name = draw(st.sampled_from(FIXTURE_NAMES))
    n = draw(st.integers(1, 32))  # within max_position_embeddings (dynamic NTK differs past it by design)
    ids = draw(st.lists(st.integers(0, 63), min_size=n, max_size=n))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    return name, np.array(ids), cuts


@given(cases())
def test_cached_decoding_equals_full_forward(mlx_engines, case):
    name, ids, cuts = case
    engine = mlx_engines(name)
    full = engine.logits(ids)
    cache = engine.new_cache(1, len(ids) + 3)
    chunks = [engine.forward(piece[None], cache)[0] for piece in np.split(ids, cuts)]
    assert cache.length == len(ids)
    np.testing.assert_allclose(np.concatenate(chunks), full, rtol=0, atol=F32_ATOL)


def _unevaluated_ops(*arrays: mx.array) -> int:
    """Operations still pending behind `arrays` (MLX's DOT export lists only the unevaluated graph)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *arrays)
    return dot.getvalue().count("shape=rectangle")


def test_the_graph_does_not_grow_across_decode_steps(mlx_engines):
    """Forward calls whose logits nobody reads still leave evaluated cache buffers, so no step's graph reaches back
    into earlier steps; and decoding writes the preallocated buffers in place (one address throughout)."""
    pending = mx.zeros((4,))
    for i in range(3):  # the probe does see a graph that grows
        pending[i:i + 1] = mx.ones((1,))
    assert _unevaluated_ops(pending) >= 3

    engine = mlx_engines("llama32")
    cache = engine.new_cache(1, 4096)
    engine.model.forward(np.arange(8)[None], cache)
    for t in range(40):
        engine.model.forward(np.array([[t % 60]]), cache)  # logits discarded, never evaluated
        assert _unevaluated_ops(*cache.keys, *cache.values) == 0
    addresses = {_address(cache.keys[0])}
    logits = engine.forward(np.array([[1]]), cache)[0, -1]
    for _ in range(40):
        logits = engine.forward(np.array([[int(np.argmax(logits))]]), cache)[0, -1]
        addresses.add(_address(cache.keys[0]))
    assert len(addresses) == 1


# ---------------------------------------------------------------- SmolLM2 (the default model)


@pytest.fixture(scope="module")
def smollm2():
    return refllama.load(smollm2_path(), backend="mlx", dtype="float32"), load_npz(GOLDEN / "smollm2.npz")


@pytest.mark.parametrize("prompt", ["chat", "code"])  # 42 and 72 tokens: MLX's CPU matmul is slow
def test_smollm2_float32_logits_match_hf(smollm2, prompt):
    engine, g = smollm2
    assert_smollm2_logits(engine.logits(g[f"{prompt}_ids"]), g, prompt)


def test_smollm2_greedy_continuation_matches_hf(smollm2):
    engine, g = smollm2
    assert engine.generate_ids(g["chat_ids"], 32) == g["chat_greedy_f32"].tolist()  # 8 tokens, ends at eos
