"""The array-API backend on array-api-strict: each operation against refllama/model/ops.py, then end to end
against HF (golden/) and the numpy backend.

Bounds: the numpy backend's (tests/conftest.py): float64 1e-12 and float32 2e-5 against the golden logits, argmax
where HF's top-1/top-2 margin exceeds 1e-3; cached decoding and padded batches against one full pass within the
same bounds; the quantized fixture within its numpy bound (tests/test_quant_fixtures.py). On array-api-strict
(NumPy underneath) the backend runs ops.py's operations in ops.py's order, so it is also held bit for bit to the
numpy backend, which is the sharper check that the order is the same.

Measured (max |logit diff| over lengths 1, 10, 48): float64 2.2e-15 .. 4.6e-15, float32 1.2e-6 .. 2.7e-6 per
fixture, identical to the numpy backend's; the module runs in about 5 s on one core.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import refllama
from refllama.backends import backend_class, get_backend, names
from refllama.config import ActivationType
from refllama.dtypes import DataType
from refllama.errors import BackendError
from refllama.model import ops
from refllama.model.weights import Linear
from refllama.quant import PackedIntWeight

from conftest import (
    F32_ATOL,
    F64_ATOL,
    FIXTURE_NAMES,
    LENGTHS,
    QUANT,
    assert_close,
    decode_rows,
    engine_cache,
    golden,
    quant_golden,
)
from test_quant_fixtures import reference_key

xps = pytest.importorskip("array_api_strict", reason="the array_api extra is not installed")

from array_api_compat import array_namespace  # noqa: E402  (after the skip, as the backend below)

from refllama.backends import array_api_backend  # noqa: E402  (after the skip: it needs array-api-compat)
from refllama.backends.array_api_backend import ENV, ArrayApiBackend  # noqa: E402

DTYPES = ["float64", "float32"]
ATOL = {"float64": F64_ATOL, "float32": F32_ATOL}
QUANT_NAME = "tiny-w4a16-g32-asym"  # packed 4-bit codes with scales and zero points: every field crosses over


@pytest.fixture(scope="module")
def engines():
    """Fixtures on the array_api backend, found by name, on its default namespace whatever the environment says."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(ENV, raising=False)
        yield engine_cache("array_api")


@pytest.fixture(scope="module")
def reference():
    return engine_cache("numpy")


def _rng_arrays(seed: int, dtype: str, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


# ---------------------------------------------------------------- registry and namespace


def test_found_by_name_on_array_api_strict(engines, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert "array_api" in names() and backend_class("array_api") is ArrayApiBackend
    backend = get_backend("array_api", "float64")
    assert backend.xp is xps
    weights = engines("llama32", "float64").model.weights
    assert array_namespace(weights.embeddings) is xps


def test_namespace_from_the_environment_or_the_argument(monkeypatch):
    import array_api_compat.numpy as compat_numpy

    monkeypatch.setenv(ENV, "numpy")
    assert get_backend("array_api", "float32").xp is compat_numpy
    assert ArrayApiBackend(namespace=xps).xp is xps
    assert ArrayApiBackend(namespace="array_api_strict").xp is xps
    monkeypatch.setenv(ENV, "no_such_array_module")
    with pytest.raises(BackendError, match=f"'no_such_array_module'.*{ENV}"):
        get_backend("array_api", "float32")


def test_half_precision_is_not_offered():
    with pytest.raises(BackendError, match="computes in float32, float64"):
        get_backend("array_api", "float16")


# ---------------------------------------------------------------- each operation, bit for bit against ops.py


@pytest.fixture(params=DTYPES)
def pair(request):
    return ArrayApiBackend(DataType.parse(request.param), namespace=xps), request.param


def test_embedding_and_matmul(pair):
    xp, dtype = pair
    table, x, w, b = _rng_arrays(0, dtype, (11, 8), (2, 3, 8), (5, 8), (5,))
    ids = np.array([[0, 10, 3], [3, 3, 7]])
    np.testing.assert_array_equal(xp.to_numpy(xp.embedding(xp.asarray(table), xp.asarray(ids))),
                                  ops.embedding(table, ids))
    got = xp.linear(xp.asarray(x), Linear(xp.asarray(w), xp.asarray(b)))
    np.testing.assert_array_equal(xp.to_numpy(got), ops.linear(x, w, b))


def test_rms_norm_and_rope(pair):
    xp, dtype = pair
    x, w, q, cos, sin = _rng_arrays(1, dtype, (2, 3, 8), (8,), (2, 4, 3, 6), (2, 1, 3, 6), (2, 1, 3, 6))
    np.testing.assert_array_equal(xp.to_numpy(xp.rms_norm(xp.asarray(x), xp.asarray(w), 1e-6)),
                                  ops.rms_norm(x, w, 1e-6))
    np.testing.assert_array_equal(xp.to_numpy(xp.apply_rope(xp.asarray(q), xp.asarray(cos), xp.asarray(sin))),
                                  ops.apply_rope(q, cos, sin))


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])  # (H, KV): MHA, GQA, MQA
def test_attention_with_padding_queries(pair, heads):
    """Causal masks with left padding, including fully masked rows, which stay finite as in ops.py."""
    xp, dtype = pair
    H, KV = heads
    T, S, D = 3, 7, 4
    q, k, v = _rng_arrays(2, dtype, (2, H, T, D), (2, KV, S, D), (2, KV, S, D))
    mask = np.arange(S)[None, :] <= (S - T + np.arange(T))[:, None]  # (T, S) causal after S - T cached
    mask = np.stack([mask, mask & (np.arange(S) >= S - 1)])  # row 1: its first queries see nothing at all
    assert not mask[1, 0].any()
    got = xp.to_numpy(xp.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), xp.asarray(mask)))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, ops.attention(q, k, v, mask))


@pytest.mark.parametrize("act", list(ActivationType))
def test_gated_activation(pair, act):
    """Every activation, GELU's host erf included (only silu and gelu appear in the fixtures)."""
    xp, dtype = pair
    gate, up = _rng_arrays(3, dtype, (2, 3, 16), (2, 3, 16))
    got = xp.to_numpy(xp.gated_activation(xp.asarray(gate), xp.asarray(up), act))
    np.testing.assert_array_equal(got, ops.gated_activation(gate, up, act))


@pytest.mark.parametrize("writeable", [True, False])
def test_cache_write_in_place_or_rebuilt(pair, monkeypatch, writeable):
    """Writeable arrays are assigned in place; immutable ones (JAX) get the buffer rebuilt with concat."""
    xp, dtype = pair
    monkeypatch.setattr(array_api_backend.array_api_compat, "is_writeable_array", lambda a: writeable)
    values = _rng_arrays(4, dtype, (2, 3, 2, 4))[0]
    buffer = xp.zeros((2, 3, 6, 4))
    out = xp.cache_write(buffer, xp.asarray(values), 3)
    expected = np.zeros((2, 3, 6, 4), dtype)
    expected[:, :, 3:5] = values
    np.testing.assert_array_equal(xp.to_numpy(out), expected)
    assert (out is buffer) == writeable


# ---------------------------------------------------------------- golden files and the numpy backend


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("length", LENGTHS)
def test_float64_matches_true_float64_hf(engines, name, length):
    g = golden(name)
    ours = engines(name, "float64").logits(g[f"ids_{length}"])
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, g[f"logits_{length}_f64"], rtol=0, atol=F64_ATOL)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("length", LENGTHS)
def test_float32_matches_hf_float32(engines, name, length):
    g = golden(name)
    ours = engines(name, "float32").logits(g[f"ids_{length}"])
    assert ours.dtype == np.float32
    assert_close(ours, g[f"logits_{length}_f32"], F32_ATOL)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_as_the_numpy_backend(engines, reference, name, dtype):
    ids = golden(name)[f"ids_{max(LENGTHS)}"]
    np.testing.assert_array_equal(engines(name, dtype).logits(ids), reference(name, dtype).logits(ids))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_continuation_matches_hf_generate(engines, name, dtype):
    g = golden(name)
    new = engines(name, dtype).generate_ids(g["ids_10"], max_new_tokens=16)
    assert new == g["greedy_f32" if dtype == "float32" else "greedy_f64"].tolist()


# ---------------------------------------------------------------- the KV cache and padded batches


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cached_decoding_equals_a_full_forward(engines, name, dtype):
    """Within max_position_embeddings (dynamic NTK differs past it by design, checked below)."""
    engine = engines(name, dtype)
    n = min(30, engine.config.max_position_embeddings)
    ids = np.random.default_rng(0).integers(0, 64, n)
    full = engine.logits(ids)
    for cuts in ([1, 2, 3], [10, 11, 20], [n - 1]):
        cache = engine.new_cache(1, len(ids) + 3)
        chunks = [engine.forward(piece[None], cache)[0] for piece in np.split(ids, cuts)]
        assert cache.length == len(ids)
        np.testing.assert_allclose(np.concatenate(chunks), full, rtol=0, atol=ATOL[dtype])


@pytest.mark.parametrize("dtype,key", [("float64", "cached_decode_f64"), ("float32", "cached_decode_f32")])
def test_dynamic_ntk_cached_decoding_follows_hf_semantics(engines, dtype, key):
    g = golden("dynamic")
    rows = decode_rows(engines("dynamic", dtype), g[f"ids_{max(LENGTHS)}"], prefill=16)
    np.testing.assert_allclose(rows, g[key], rtol=0, atol=ATOL[dtype])


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_batch_matches_single_sequences(engines, name, dtype):
    """Left padding, masks and per-row positions (padding queries attend to nothing), then two decode steps."""
    engine = engines(name, dtype)
    a, b = np.arange(3, 12), np.arange(20, 25)
    pad = len(a) - len(b)
    ids = np.zeros((2, len(a)), np.int64)
    ids[0], ids[1, pad:] = a, b
    mask = (np.arange(len(a))[None] >= np.array([[0], [pad]])).astype(np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    cache = engine.new_cache(2, len(a) + 2)
    out = engine.forward(ids, cache, attention_mask=mask, positions=positions)
    np.testing.assert_allclose(out[0], engine.logits(a), rtol=0, atol=ATOL[dtype])
    np.testing.assert_allclose(out[1, pad:], engine.logits(b), rtol=0, atol=ATOL[dtype])
    nxt = np.array([[30], [31]])
    for step in range(2):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        out = engine.forward(nxt, cache, attention_mask=mask, positions=positions[:, -1:] + step + 1)
    np.testing.assert_allclose(out[0, 0], engine.logits(np.r_[a, 30, 30])[-1], rtol=0, atol=ATOL[dtype])
    np.testing.assert_allclose(out[1, 0], engine.logits(np.r_[b, 31, 31])[-1], rtol=0, atol=ATOL[dtype])


# ---------------------------------------------------------------- a quantized fixture through the fallback


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_fixture_runs_its_reference_on_the_host(dtype, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    g = quant_golden(QUANT_NAME)
    engine = refllama.load(QUANT / QUANT_NAME, backend="array_api", dtype=dtype)
    weight = engine.model.weights.layers[0].mlp.up_proj.weight
    assert isinstance(weight, PackedIntWeight) and array_namespace(weight.packed) is xps
    numpy_engine = refllama.load(QUANT / QUANT_NAME, backend="numpy", dtype=dtype)
    for prompt in ("a", "b"):
        ours = engine.logits(g[f"ids_{prompt}"])
        assert_close(ours, g[reference_key(QUANT_NAME, prompt)], F32_ATOL)  # the references are float32
        np.testing.assert_array_equal(ours, numpy_engine.logits(g[f"ids_{prompt}"]))


def test_gelu_erf_is_math_erf():
    """Exact GELU's erf is math.erf on the host: in float64 the backend equals the formula on Python floats."""
    xp = ArrayApiBackend(DataType.F64, namespace=xps)
    g = np.array([-2.5, -0.3, 0.0, 0.7, 3.0])
    got = xp.to_numpy(xp.gated_activation(xp.asarray(g), xp.asarray(np.ones(5)), ActivationType.Gelu))
    expected = [v * 0.5 * (1.0 + math.erf(v * math.sqrt(0.5))) for v in g]
    np.testing.assert_array_equal(got, expected)
