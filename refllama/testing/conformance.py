"""The backend conformance suite: every operation of every installed backend, in every compute dtype it declares,
against the reference arithmetic, and whole models against transformers' golden logits.

Use it from a test module (refllama's own is tests/test_conformance.py; docs/oracle.md, "Testing a backend"):

    from refllama.testing.conformance import *  # noqa: F403

Its tests run once per (backend, dtype): each backend `refllama.backends.installed()` finds, in each dtype its
class declares (`Backend.dtypes`), carrying the class's pytest marker (`Backend.marker`), narrowed by the plugin's
`--refllama-backends` / `--refllama-dtypes` options. Ids read `test_rms_norm[mlx-bfloat16-...]`.

The reference is refllama/model/ops.py (the numpy backend) and, for quantized weights, the weight's own
`dequantize` / `matmul` (refllama/quant). Inputs are rounded to the compute dtype first, so both sides see the same
values. Bounds (eps: the compute dtype's machine epsilon):

* float32, float64: against the reference in the same dtype, |ours - ref| <= 8 eps max|ref| (each backend's own
  rounding and summation order; for a Linear, max|ref| over all the token counts tried, since one dot product
  alone may cancel); attention 4 eps max|v| (test_attention says why). Bit for bit where the arithmetic allows
  no other result: gathers, the cache write, conversions, RoPE, ReLU, W8A8 (integer codes and accumulators, then
  the reference's epilogue), ggml blocks' dequantization, and integer codes' dequantization with bfloat16 or
  float16 scales ((code - zero) * scale is exact in float32; with float32 scales it rounds, so the float bound).
* float16, bfloat16: against the reference in float64 on the same rounded inputs, |ours - ref| <= 2 eps max|ref|
  (one rounding of the result to the half type, and a few intermediates rounded as transformers rounds them);
  attention 1 eps max|v|; gathers and the dequantization as above, bit for bit.
* golden logits (golden/, tests/fixtures/): the bounds of refllama.testing.golden: float64 1e-12 against
  transformers patched to true float64, float32 2e-5 and the same argmax wherever transformers' top-1/top-2 margin
  exceeds 1e-3, bfloat16 / float16 0.1 / 0.015 against transformers float32 (the quantized fixtures: 0.2 / 0.03,
  W8A8 0.5).

The golden part needs the fixture checkpoints and golden files of a refllama checkout (golden/ beside
tests/fixtures/): the plugin's `--refllama-golden-dir` (or ini `refllama_golden_dir`), else the checkout refllama
is installed from. Without one those tests skip, saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refllama
from refllama.backends import Backend, backend_class, get_backend
from refllama.config import ActivationType
from refllama.dtypes import DataType
from refllama.errors import BackendError
from refllama.formats.ggml_quants import GGMLType
from refllama.model.weights import Linear, map_arrays
from refllama.quant.gguf_blocks import GGUFBlockWeight
from refllama.quant.int8 import INT8_MAX_K
from refllama.quant.types import ActivationQuant, Int8Weight, PackedIntWeight
from refllama.testing import random_weights
from refllama.testing.golden import (
    F32_ATOL,
    F64_ATOL,
    HALF_ATOL,
    QUANT_HALF_ATOL,
    W8A8_HALF_ATOL,
    W8A8_HF_ATOL,
    W8A8_HF_TOP1,
    assert_close,
    decode_rows,
    reference_key,
)
from refllama.testing.plugin import EngineSpec, GoldenFiles, backend_marks, golden_dir, selected_engines

FLOATS = (DataType.F32, DataType.F64)

# ---------------------------------------------------------------- the candidate and its reference


@dataclass(frozen=True)
class Candidate:
    """One backend in one compute dtype, beside the reference it is held to: the numpy backend in the same dtype
    (float32, float64), or in float64 (half precision)."""

    spec: EngineSpec

    @cached_property
    def xp(self) -> Backend:
        return get_backend(self.spec.backend, self.spec.dtype)

    @cached_property
    def ref(self) -> Backend:
        return get_backend("numpy", self.data_type if self.data_type in FLOATS else DataType.F64)

    @property
    def data_type(self) -> DataType:
        return DataType.parse(self.spec.dtype)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data_type.numpy_dtype)

    @property
    def half(self) -> bool:
        return self.data_type not in FLOATS

    @property
    def eps(self) -> float:
        return float(ml_dtypes.finfo(self.dtype).eps)

    @property
    def factor(self) -> float:
        return 2 if self.half else 8

    @property
    def golden_atol(self) -> float:
        """The bound against transformers' logits (golden/): float64, float32, or the half type's."""
        return {DataType.F64: F64_ATOL, DataType.F32: F32_ATOL}.get(self.data_type) or HALF_ATOL[self.spec.dtype]

    def host(self, rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
        """Random values rounded to the compute dtype: what both sides compute on."""
        return (rng.standard_normal(shape) * scale).astype(self.dtype)

    def rounded(self, weight: Any) -> Any:
        """A host weight with its float tensors (scales, biases) rounded to the compute dtype, as the backend's
        `asarray` rounds them: the matrix the backend is asked to multiply by."""
        return map_arrays(weight, lambda a: a.astype(self.dtype) if _is_float(a) else a)

    def take(self, weight: Any) -> Any:
        """The weight (a Linear, a quantized weight, an array) through the backend's asarray, as the engine does."""
        return map_arrays(weight, self.xp.asarray)

    def result(self, out: Any) -> np.ndarray:
        got = self.xp.to_numpy(out)
        assert got.dtype == self.dtype, f"result in {got.dtype}, not the compute dtype {self.dtype}"
        return got

    def assert_close(self, out: Any, expected: np.ndarray, scale: float | None = None,
                     factor: float | None = None) -> None:
        """|ours - ref| <= factor eps scale: 8 (float32, float64) or 2 (half precision) eps max|ref| unless told."""
        got = self.result(out)
        assert got.shape == expected.shape
        scale = float(np.abs(expected).max()) if scale is None else scale
        atol = (self.factor if factor is None else factor) * self.eps * scale
        np.testing.assert_allclose(got.astype(np.float64), expected.astype(np.float64), rtol=0, atol=atol)

    def assert_exact(self, out: Any, expected: np.ndarray) -> None:
        got = self.result(out)
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got.astype(np.float64), expected.astype(np.float64))


def _is_float(a: Any) -> bool:
    dtype = np.asarray(a).dtype
    return dtype.kind == "f" or dtype == random_weights.BF16


def accepts(cls: type[Backend], weight_type: type) -> bool:
    """Whether a backend runs Linears with this quantized weight type (a kernel, or the reference fallback)."""
    return weight_type in cls.linear_kernels or cls.quantized_fallback == "reference"


def block_types(cls: type[Backend]) -> list[str]:
    """The ggml block types a backend reads as stored (GGUFBlockWeight), in GGMLType order."""
    return [t.name for t in GGMLType if t.name in cls.reads_as_stored and t.name.startswith("Q")]


# ---------------------------------------------------------------- parametrization


def dtypes(*names: str):
    """Run a test only in these compute dtypes (the other dtypes have no reference for it)."""

    def mark(fn):
        fn.conformance_dtypes = names
        return fn

    return mark


def quantized(weight_type: type):
    """Run a test only on backends that accept this quantized weight type."""

    def mark(fn):
        fn.conformance_weight = weight_type
        return fn

    return mark


_SPECS = pytest.StashKey[list[EngineSpec]]()
_GOLDEN = pytest.StashKey["GoldenFiles | None"]()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`candidate` over every (backend, dtype); with it `ggml_type` over that backend's block types, and
    `golden_name` / `quant_name` over the fixtures of the golden directory."""
    if "candidate" not in metafunc.fixturenames:
        return
    config = metafunc.config
    if _SPECS not in config.stash:
        config.stash[_SPECS] = selected_engines(config, dtypes=None)
    fn = metafunc.function
    wanted = getattr(fn, "conformance_dtypes", None)
    weight_type = getattr(fn, "conformance_weight", None)
    specs = [s for s in config.stash[_SPECS] if (wanted is None or s.dtype in wanted)
             and (weight_type is None or accepts(backend_class(s.backend), weight_type))]
    if "ggml_type" in metafunc.fixturenames:
        pairs = [(s, t) for s in specs for t in block_types(backend_class(s.backend))]
        metafunc.parametrize(["candidate", "ggml_type"], [
            pytest.param(s, t, id=f"{s.id}-{t}", marks=backend_marks(s.backend)) for s, t in pairs], indirect=[
            "candidate"], scope="module")
    else:
        metafunc.parametrize("candidate", [pytest.param(s, id=s.id, marks=backend_marks(s.backend)) for s in specs],
                             indirect=True, scope="module")
    for argname, names in (("golden_name", "fixtures"), ("quant_name", "quant_fixtures")):
        if argname in metafunc.fixturenames:
            golden = golden_files(config)
            if golden is None:
                metafunc.parametrize(argname, [pytest.param(None, id="no-golden-dir", marks=pytest.mark.skip(
                    reason=NO_GOLDEN))])
            else:
                metafunc.parametrize(argname, getattr(golden, names))


@pytest.fixture(scope="module")
def candidate(request: pytest.FixtureRequest) -> Candidate:
    """The backend under test in one compute dtype (parametrized by pytest_generate_tests)."""
    return Candidate(request.param)


# ---------------------------------------------------------------- the golden data


NO_GOLDEN = ("no golden directory: pass --refllama-golden-dir DIR (a refllama checkout's golden/, with its "
             "tests/fixtures/ beside it) or set refllama_golden_dir in the ini file")


def golden_files(config: pytest.Config) -> GoldenFiles | None:
    """The golden directory the plugin finds, when it holds a manifest.json (once per session); else None."""
    if _GOLDEN not in config.stash:
        directory = golden_dir(config)
        found = directory is not None and (directory / "manifest.json").is_file()
        config.stash[_GOLDEN] = GoldenFiles(directory) if found else None
    return config.stash[_GOLDEN]


@pytest.fixture(scope="session")
def goldens(pytestconfig: pytest.Config) -> GoldenFiles:
    """The golden files (refllama.testing.plugin.GoldenFiles); the test skips, saying why, without them."""
    golden = golden_files(pytestconfig)
    if golden is None:
        pytest.skip(NO_GOLDEN)
    return golden


@pytest.fixture(scope="module")
def candidate_engines(candidate: Candidate, goldens: GoldenFiles):
    """get(name, semantics="hf"): a golden fixture (or a quantized one, by folder name) loaded on the candidate,
    once per module and candidate."""
    loaded: dict[tuple[str, str], Any] = {}

    def get(name: str, semantics: str = "hf"):
        if (name, semantics) not in loaded:
            path = goldens.checkpoint(name) if name in goldens.fixtures else goldens.quant_checkpoint(name)
            loaded[name, semantics] = refllama.load(path, backend=candidate.spec.backend, dtype=candidate.spec.dtype,
                                                    quant_semantics=semantics)
        return loaded[name, semantics]

    return get


# ---------------------------------------------------------------- arrays in and out


def test_undeclared_dtypes_are_refused(candidate):
    """A compute dtype the class does not declare is a BackendError naming the backend, never a silent cast."""
    cls = type(candidate.xp)
    for dtype in (DataType.F64, DataType.F32, DataType.F16, DataType.BF16):
        if dtype not in cls.dtypes:
            with pytest.raises(BackendError, match=f"{cls.name} backend computes in"):
                get_backend(cls.name, dtype)


def test_asarray_rounds_once_and_keeps_integers(candidate, tmp_path):
    """Floats of any stored type (float64, float32, bfloat16, float16; transposed, read-only memory-mapped) become
    the compute dtype, rounded once; integer ids and bool masks keep their type and values."""
    xp = candidate.xp
    x64 = np.random.default_rng(7).standard_normal((4, 6)) * 3
    sources = [x64, x64.T, x64[:, ::2], x64.astype(np.float32), x64.astype(ml_dtypes.bfloat16),
               x64.astype(np.float16), x64.astype(np.float32).T]
    path = tmp_path / "weights.bin"
    x64.astype(np.float32).tofile(path)
    sources.append(np.memmap(path, dtype=np.float32, mode="r", shape=(4, 6)))  # read-only, as safetensors views
    for source in sources:
        got = xp.to_numpy(xp.asarray(source))
        expected = np.asarray(source).astype(candidate.dtype)
        if not ("BF16" in xp.reads_as_stored and source.dtype == random_weights.BF16):  # else kept as stored
            assert got.dtype == candidate.dtype
        np.testing.assert_array_equal(got.astype(np.float64), expected.astype(np.float64))
    ids, mask = np.arange(6).reshape(2, 3), np.array([[True, False]])
    assert xp.to_numpy(xp.asarray(ids)).dtype == np.int64 and xp.to_numpy(xp.asarray(mask)).dtype == np.bool_
    np.testing.assert_array_equal(xp.to_numpy(xp.asarray(ids)), ids)
    np.testing.assert_array_equal(xp.to_numpy(xp.asarray(mask)), mask)


def test_to_numpy_round_trips_every_bit(candidate):
    """Values of the compute dtype come back bit for bit (signed zeros, subnormals and extremes included)."""
    if candidate.dtype.itemsize == 2:
        bits = np.arange(0, 2**16, 7, dtype=np.uint16)
        values = bits.view(candidate.dtype)
    else:
        uint = np.uint32 if candidate.dtype.itemsize == 4 else np.uint64
        values = np.random.default_rng(8).integers(0, np.iinfo(uint).max, 4096, dtype=uint).view(candidate.dtype)
    finfo = ml_dtypes.finfo(candidate.dtype)
    values = np.concatenate([values, np.array([0.0, -0.0, finfo.tiny, finfo.max, finfo.min]).astype(values.dtype)])
    values = values[np.isfinite(values)]
    got = candidate.result(candidate.xp.asarray(values))
    np.testing.assert_array_equal(got.view(np.uint8), values.view(np.uint8))


def test_zeros_and_cache_write(candidate):
    """The KV cache buffers: zeros of the compute dtype, written at [:, :, start:start + T] as the cache fills."""
    xp = candidate.xp
    buffer = xp.zeros((2, 3, 10, 4))
    expected = np.zeros((2, 3, 10, 4), candidate.dtype)
    candidate.assert_exact(buffer, expected)
    for start, T in [(0, 3), (3, 1), (4, 5), (9, 1)]:
        values = candidate.host(np.random.default_rng(start), 2, 3, T, 4)
        buffer = xp.cache_write(buffer, xp.asarray(values), start)
        expected[:, :, start:start + T] = values
        candidate.assert_exact(buffer, expected)


# ---------------------------------------------------------------- the float operations


@pytest.mark.parametrize("V,D", [(1, 1), (50, 16), (77, 33)])
def test_embedding_is_an_exact_gather(candidate, V, D):
    rng = np.random.default_rng(V)
    table = candidate.host(rng, V, D)
    ids = rng.integers(0, V, (2, 7))
    ids[0, :2] = 0, V - 1  # both ends of the table, and repeats
    candidate.assert_exact(candidate.xp.embedding(candidate.xp.asarray(table), candidate.xp.asarray(ids)), table[ids])


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 96), (2, 7, 576), (1, 3, 2048)])
def test_rms_norm(candidate, shape):
    rng = np.random.default_rng(sum(shape))
    x, w = candidate.host(rng, *shape, scale=3), candidate.host(rng, shape[-1])
    xp, ref = candidate.xp, candidate.ref
    candidate.assert_close(xp.rms_norm(xp.asarray(x), xp.asarray(w), 1e-5),
                           ref.rms_norm(ref.asarray(x), ref.asarray(w), 1e-5))


@pytest.mark.parametrize("B,H,T,D", [(1, 1, 1, 2), (2, 6, 5, 32), (1, 9, 7, 64), (2, 3, 1, 24)])
def test_apply_rope_on_the_models_strided_view(candidate, B, H, T, D):
    """q arrives as (B, T, H, D) memory transposed to (B, H, T, D); angles up to 50 rad (late positions)."""
    rng = np.random.default_rng(H * T * D)
    host = candidate.host(rng, B, T, H, D)
    angles = rng.uniform(-50, 50, (B, 1, T, D // 2))
    angles = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(angles).astype(candidate.dtype), np.sin(angles).astype(candidate.dtype)
    xp, ref = candidate.xp, candidate.ref
    flat = host.reshape(B, T, H * D)  # as a Linear leaves q; split_heads makes the model's view of it
    got = xp.apply_rope(xp.split_heads(xp.asarray(flat), H), xp.asarray(cos), xp.asarray(sin))
    expected = ref.apply_rope(ref.split_heads(ref.asarray(flat), H), ref.asarray(cos), ref.asarray(sin))
    if candidate.half:
        candidate.assert_close(got, expected)
    else:  # x * cos + rotated * sin, each product and the sum rounded once (no fused multiply-add): one result
        candidate.assert_exact(got, expected)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 3), (8, 1)], ids=["MHA", "GQA2", "GQA3", "MQA"])
@pytest.mark.parametrize("T,past", [(1, 0), (1, 7), (5, 0), (5, 4), (1, 300), (3, 34)])
def test_attention(candidate, heads, T, past):
    """Causal masks after `past` cached tokens; batch row 1 left-padded, so its first queries see nothing at all
    (fully masked rows: finite, the reference's uniform average of V); head_dim 16 and 24; K and V as plain arrays,
    as a reversed host view, and as the cache hands them over (a prefix of a larger buffer).

    Bound: half the op factor times eps max|v| (4 eps for float32 / float64, 1 for half precision). Each output is
    a weighted average of V rows, so its rounding scales with max|v|, not with the average itself, which a long
    cache shrinks towards 0; on short caches (S <= 9) this is tighter than 8 eps max|out| unless max|v| exceeds
    2 max|out| (median 1.2 over random inputs)."""
    H, KV = heads
    B, S = 2, past + T
    rng = np.random.default_rng(H * 1000 + T * 10 + past)
    xp, ref = candidate.xp, candidate.ref
    mask = np.broadcast_to(np.arange(S)[None, :] <= (past + np.arange(T))[:, None], (B, T, S)).copy()
    mask[1, :, : S // 2 + 1] = False
    mask[1, 0] = False  # a padding query
    for D in (16, 24):
        q, k, v = candidate.host(rng, B, H, T, D), candidate.host(rng, B, KV, S, D), candidate.host(rng, B, KV, S, D)
        expected = ref.attention(ref.asarray(q), ref.asarray(k), ref.asarray(v), mask)
        buffers = [xp.cache_write(xp.zeros((B, KV, S + 5, D)), xp.asarray(a), 0) for a in (k, v)]
        layouts = [(xp.asarray(k), xp.asarray(v)), (buffers[0][:, :, :S, :], buffers[1][:, :, :S, :])]
        reversed_k, reversed_v = k[:, :, ::-1], v[:, :, ::-1]  # same keys and values in the other slot order
        reversed_expected = ref.attention(ref.asarray(q), ref.asarray(reversed_k), ref.asarray(reversed_v),
                                          mask[:, :, ::-1])
        scale, factor = float(np.abs(v.astype(np.float64)).max()), candidate.factor / 2
        for keys, values in layouts:
            out = xp.attention(xp.asarray(q), keys, values, xp.asarray(mask))
            assert np.isfinite(candidate.result(out).astype(np.float64)).all()
            candidate.assert_close(out, expected, scale, factor)
        out = xp.attention(xp.asarray(q), xp.asarray(reversed_k), xp.asarray(reversed_v),
                           xp.asarray(np.ascontiguousarray(mask[:, :, ::-1])))
        candidate.assert_close(out, reversed_expected, scale, factor)


@pytest.mark.parametrize("act", list(ActivationType), ids=lambda a: a.value)
@pytest.mark.parametrize("shape", [(1, 7), (3, 200), (2, 5, 33)])
def test_gated_activation(candidate, act, shape):
    rng = np.random.default_rng(4)
    gate, up = candidate.host(rng, *shape, scale=3), candidate.host(rng, *shape)
    xp, ref = candidate.xp, candidate.ref
    got = xp.gated_activation(xp.asarray(gate), xp.asarray(up), act)
    expected = ref.gated_activation(ref.asarray(gate), ref.asarray(up), act)
    if act is ActivationType.Relu and not candidate.half:  # max(x, 0) * up: one rounding
        candidate.assert_exact(got, expected)
    else:
        candidate.assert_close(got, expected)


# ---------------------------------------------------------------- Linear: float weights


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 5, 7), (3, 8, 64), (5, 9, 100), (9, 4, 33), (13, 7, 576),
                                   (2, 80, 96), (20, 83, 96), (8, 83, 256)])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_float_linear(candidate, M, N, K, bias):
    rng = np.random.default_rng(M * 100 + N * 10 + K)
    x, w = candidate.host(rng, 1, M, K, scale=2), candidate.host(rng, N, K, scale=0.1)
    b = candidate.host(rng, N) if bias else None
    layer = Linear(w, b)
    candidate.assert_close(candidate.xp.linear(candidate.xp.asarray(x), candidate.take(layer)),
                           candidate.ref.linear(candidate.ref.asarray(x), map_arrays(layer, candidate.ref.asarray)))


@pytest.mark.parametrize("M,K", [(1, 7), (2, 64), (3, 33), (5, 96), (8, 96), (9, 33), (20, 64)])
def test_linears_of_one_input(candidate, M, K):
    """`linears` (the Linears that read one input: q/k/v, gate/up; a backend may run them as one kernel): each
    output within the float bound of its own Linear in the reference, for three weights (one with a bias; row
    counts not a multiple of 4) and for two."""
    rng = np.random.default_rng(M * 100 + K)
    x = candidate.host(rng, 1, M, K, scale=2)
    layers = [Linear(candidate.host(rng, 13, K, scale=0.1)), Linear(candidate.host(rng, 6, K, scale=0.1),
                                                                      candidate.host(rng, 6)),
              Linear(candidate.host(rng, 5, K, scale=0.1))]
    for group in (layers, layers[:2]):
        got = candidate.xp.linears(candidate.xp.asarray(x), [candidate.take(layer) for layer in group])
        assert len(got) == len(group)
        for out, layer in zip(got, group, strict=True):
            candidate.assert_close(out, candidate.ref.linear(candidate.ref.asarray(x),
                                                             map_arrays(layer, candidate.ref.asarray)))


@quantized(Int8Weight)
def test_linears_mixing_weight_types(candidate):
    """`linears` over a float weight and a quantized one (which no fused kernel reads together): each output within
    the float bound of its own Linear in the reference, decode and prefill."""
    rng = np.random.default_rng(7)
    K = 96
    quantized_layer = Linear(candidate.rounded(random_weights.int8_weight(rng, 9, K, group_size=32)))
    layers = [Linear(candidate.host(rng, 11, K, scale=0.1)), quantized_layer]
    for M in (1, 3, 12):
        x = candidate.host(rng, 1, M, K)
        got = candidate.xp.linears(candidate.xp.asarray(x), [candidate.take(layer) for layer in layers])
        for out, layer in zip(got, layers, strict=True):
            candidate.assert_close(out, candidate.ref.linear(candidate.ref.asarray(x),
                                                             map_arrays(layer, candidate.ref.asarray)))


# ---------------------------------------------------------------- Linear: quantized weights


def _check_quantized_linear(candidate: Candidate, weight: Any, rng: np.random.Generator,
                            tokens: tuple[int, ...] = (1, 3, 12)) -> None:
    """The weight through backend.linear: the dequantized matrix (x = I, K tokens: each output is one product by
    1.0, exact in any summation order) bit for bit where the scales make (code - zero) * scale exact in float32
    (bfloat16, float16 scales; ggml's blocks: its own float32 arithmetic), else within the float bound; then decode
    and prefill products, with a bias, against the reference's x @ W.T + b within the float bound, taking the
    largest output over all token counts as the layer's magnitude (one dot product alone may cancel)."""
    xp, ref = candidate.xp, candidate.ref
    N, K = weight.shape
    rounded = candidate.rounded(weight)
    dense = rounded.dequantize(candidate.dtype)  # the reference dequantization, in the compute dtype
    matrix = xp.linear(xp.asarray(np.eye(K, dtype=candidate.dtype)), candidate.take(Linear(weight))).T
    if isinstance(weight, GGUFBlockWeight) or np.asarray(weight.scale).dtype.itemsize == 2:
        candidate.assert_exact(matrix, dense)
    else:
        candidate.assert_close(matrix, dense)
    bias = candidate.host(rng, N)
    results = []
    for M in tokens:
        x = candidate.host(rng, M, K)
        got = xp.linear(xp.asarray(x), candidate.take(Linear(weight, bias)))
        if candidate.half:  # the product of the rounded matrix, exactly
            expected = x.astype(np.float64) @ dense.astype(np.float64).T + bias.astype(np.float64)
        else:  # the weight's own reference arithmetic in the compute dtype
            expected = ref.linear(ref.asarray(x), map_arrays(Linear(rounded, bias), ref.asarray))
        results.append((got, expected))
    scale = max(float(np.abs(expected).max()) for _, expected in results)
    for got, expected in results:
        candidate.assert_close(got, expected, scale)


INT8_CASES = {  # weight-only int8 codes: group size, zero points, act-order, one scale per tensor, scale dtype
    "per-channel": {},
    "g32-asym": {"group_size": 32, "asym": True},
    "g32-act-order": {"group_size": 32, "act_order": True},
    "g24-asym": {"group_size": 24, "asym": True},
    "per-tensor-asym": {"per_tensor": True, "asym": True},
    "f32-scales": {"group_size": 32, "scale_dtype": np.float32},
}


@quantized(Int8Weight)
@pytest.mark.parametrize("case", list(INT8_CASES))
def test_int8_weight_only_linear(candidate, case):
    """K = 100 and 200: the last group of 24 or 32 is partial."""
    rng = np.random.default_rng(len(case))
    for N, K in ((1, 100), (7, 64), (9, 200)):
        _check_quantized_linear(candidate, random_weights.int8_weight(rng, N, K, **INT8_CASES[case]), rng)


PACKED_CASES = {  # bits, group_size, asym, act_order, transposed, per_tensor
    "4-g32": (4, 32, False, False, False, False), "4-g32-asym": (4, 32, True, False, False, False),
    "4-g32-act-order-T": (4, 32, False, True, True, False), "4-asym-T": (4, None, True, False, True, False),
    "4-per-tensor": (4, None, False, False, False, True), "8-g32-asym": (8, 32, True, False, False, False),
    "8": (8, None, False, False, False, False), "8-g32-asym-act-order-T": (8, 32, True, True, True, False),
    "8-per-tensor-asym": (8, None, True, False, False, True), "2-g16-asym": (2, 16, True, False, False, False),
    "3-g32-asym": (3, 32, True, False, False, False), "5-g64": (5, 64, False, False, False, False),
    "6": (6, None, False, False, False, False), "7-g32-asym-act-order": (7, 32, True, True, False, False),
    "1-g8": (1, 8, False, False, False, False),
}


@quantized(PackedIntWeight)
@pytest.mark.parametrize("case", list(PACKED_CASES))
def test_packed_linear(candidate, case):
    """Every width, symmetric and asymmetric, act-order (GPTQ g_idx), GPTQ's transposed qweight (T), one scale per
    tensor; K = 100 and 200 leave partial groups and partial words."""
    bits, group_size, asym, act_order, transposed, per_tensor = PACKED_CASES[case]
    rng = np.random.default_rng(bits * 1000 + (group_size or 0) + per_tensor)
    for N, K in ((1, 100), (7, 64), (9, 200)):
        weight = random_weights.packed_weight(rng, N, K, bits, group_size=group_size, asym=asym, act_order=act_order,
                                              transposed=transposed, per_tensor=per_tensor)
        _check_quantized_linear(candidate, weight, rng)


def _tokens_with_ties(rng: np.random.Generator, candidate: Candidate, M: int, K: int) -> np.ndarray:
    """Tokens of very different scales; a negative absmax (the -127.5 tie of the "hf" formula); an all-zero row."""
    x = rng.standard_normal((M, K)) * rng.uniform(0.1, 10, (M, 1))
    x[0, rng.integers(K)] = -np.abs(x[0]).max() * 1.5
    if M > 1:
        x[1] = 0
    return x.astype(candidate.dtype)


@quantized(Int8Weight)
@dtypes("float32", "float64")  # in half precision the codes depend on how a backend rounds the token scale
@pytest.mark.parametrize("semantics", ["hf", "vllm"])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 3, 33), (2, 4, 100), (5, 9, 576), (12, 6, 1536), (33, 96, 128)])
def test_w8a8_linear_is_the_reference_bit_for_bit(candidate, semantics, M, N, K):
    """Per-token int8 codes, exact int32 accumulators and the reference's epilogue: no rounding is free."""
    rng = np.random.default_rng(M + N + K)
    xp, ref = candidate.xp, candidate.ref
    x = _tokens_with_ties(rng, candidate, M, K)
    for per_tensor, scale_dtype in ((False, np.float32), (True, np.float32), (False, random_weights.BF16)):
        weight = random_weights.int8_weight(rng, N, K, per_tensor=per_tensor, semantics=semantics,
                                            scale_dtype=scale_dtype)
        layer = Linear(weight, candidate.host(rng, N))
        expected = ref.linear(ref.asarray(x[None]), map_arrays(layer, ref.asarray))
        candidate.assert_exact(xp.linear(xp.asarray(x[None]), candidate.take(layer)), expected)


@quantized(Int8Weight)
@dtypes("float32", "float64")
def test_w8a8_accumulators_reach_the_int32_extremes_exactly(candidate):
    """K = 4096 codes of -128 x -128: accumulators of 2**26, past float32's 2**24, well inside int32."""
    K = 4096
    x = np.full((1, K), -1.0, candidate.dtype)  # codes all -128 ("hf": -1 / (1 / 127.5) = -127.5 -> -128)
    q = np.full((2, K), -128, np.int8)
    q[1, ::2] = 127
    weight = Int8Weight(q, np.ones((2, 1), np.float32), activation=ActivationQuant("hf"))
    expected = candidate.ref.linear(x, Linear(candidate.rounded(weight)))
    candidate.assert_exact(candidate.xp.linear(candidate.xp.asarray(x), candidate.take(Linear(weight))), expected)


@quantized(Int8Weight)
def test_w8a8_refuses_an_overflowing_k(candidate):
    """Past K = refllama.quant.int8.INT8_MAX_K an int32 accumulator could overflow: a BackendError, never a
    wrapped sum."""
    K = INT8_MAX_K + 1
    weight = Int8Weight(np.zeros((1, K), np.int8), np.ones((1, 1), np.float32), activation=ActivationQuant("hf"))
    with pytest.raises(BackendError, match="overflows"):
        candidate.result(candidate.xp.linear(candidate.xp.asarray(np.ones((1, K), candidate.dtype)),
                                             candidate.take(Linear(weight))))


@quantized(GGUFBlockWeight)
def test_gguf_block_linear_and_embedding(candidate, ggml_type):
    """ggml blocks read as stored: the embedding rows and the matrix equal ggml's dequantization (rounded to the
    compute dtype) bit for bit, and the products (decode: 1, 2, 8 tokens; prefill: 9) are within the float bound."""
    rng = np.random.default_rng(int(GGMLType[ggml_type]))
    xp = candidate.xp
    for N, K in ((1, 256), (5, 512), (8, 768)):
        weight = random_weights.gguf_weight(rng, ggml_type, N, K)
        ids = rng.integers(0, N, (2, 4))
        expected_rows = weight.dequantize(candidate.dtype)[ids]
        candidate.assert_exact(xp.embedding(candidate.take(weight), xp.asarray(ids)), expected_rows)
        _check_quantized_linear(candidate, weight, rng, tokens=(1, 2, 8, 9))


# ---------------------------------------------------------------- golden logits (transformers)


def test_fixture_logits_match_transformers(candidate, candidate_engines, goldens, golden_name, record_property):
    """float64 against HF in true float64 (1e-12), float32 against HF float32 (2e-5 and the argmax where clear),
    half precision against HF float32 at the longest length (the half type's bound)."""
    g = goldens(golden_name)
    engine = candidate_engines(golden_name)
    lengths = goldens.manifest["sequence_lengths"]
    near_ties = 0
    for length in [max(lengths)] if candidate.half else lengths:
        ours = engine.logits(g[f"ids_{length}"])
        assert ours.dtype == candidate.dtype
        if candidate.data_type is DataType.F64:
            np.testing.assert_allclose(ours, g[f"logits_{length}_f64"], rtol=0, atol=F64_ATOL)
        elif candidate.data_type is DataType.F32:
            near_ties += int((~assert_close(ours, g[f"logits_{length}_f32"], F32_ATOL)).sum())
        else:
            np.testing.assert_allclose(ours.astype(np.float32), g[f"logits_{length}_f32"], rtol=0,
                                       atol=candidate.golden_atol)
    record_property("near_ties", near_ties)


@dtypes("float32", "float64")  # no golden continuation in half precision: its decoding is cached_decoding's
def test_greedy_continuation_matches_transformers(candidate, candidate_engines, goldens, golden_name):
    """16 greedy tokens after ids_10 through the KV cache: HF generate's, in float32 and float64."""
    g = goldens(golden_name)
    key = "greedy_f64" if candidate.data_type is DataType.F64 else "greedy_f32"
    assert candidate_engines(golden_name).generate_ids(g["ids_10"], max_new_tokens=16) == g[key].tolist()


@dtypes("float32", "float64")  # HF's cached decoding is stored in float32 and float64 only
def test_dynamic_ntk_cached_decoding_follows_transformers(candidate, candidate_engines, goldens):
    """Past max_position_embeddings each cached key keeps the rotation it was written with, as HF's cache does.
    Within the limit the cache changes nothing; past it one full forward rotates every key with the final
    (enlarged) table, and so differs from cached decoding (docs/numerics.md)."""
    key = "cached_decode_f64" if candidate.data_type is DataType.F64 else "cached_decode_f32"
    names = [name for name in goldens.fixtures if key in goldens(name)]  # the dynamic-NTK fixtures
    if not names:
        pytest.skip("no dynamic-NTK fixture in the golden directory")
    for name in names:
        g = goldens(name)
        engine = candidate_engines(name)
        ids = g[f"ids_{max(goldens.manifest['sequence_lengths'])}"]
        cached = decode_rows(engine, ids, prefill=16)
        atol = candidate.golden_atol
        np.testing.assert_allclose(cached, g[key], rtol=0, atol=atol, err_msg=name)
        limit = engine.config.max_position_embeddings
        np.testing.assert_allclose(cached[:limit], engine.logits(ids[:limit]), rtol=0, atol=atol, err_msg=name)
        assert np.abs(cached[limit:] - engine.logits(ids)[limit:]).max() > 100 * atol, name


@st.composite
def _cases(draw: st.DrawFn, max_length: int) -> tuple[np.ndarray, list[int]]:
    n = draw(st.integers(1, max_length))
    ids = draw(st.lists(st.integers(0, 63), min_size=n, max_size=n))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    return np.array(ids), cuts


# per (backend, dtype): 8 of the "ci" profile's 25. No deadline: an example may be the first to load its fixture on
# the backend (and compile numba's kernels), in a project whose own Hypothesis profile may keep the 200 ms default.
@settings(max_examples=max(5, settings().max_examples // 3), deadline=None)
@given(data=st.data())
def test_cached_decoding_equals_a_full_forward(candidate, candidate_engines, goldens, data):
    """Any split of a sequence into a prefill and decode chunks, through a cache larger than needed: the logits of
    one full forward, within the golden bound of the dtype. A third of the Hypothesis profile's examples for each
    (backend, dtype), since every pair runs it (six here: 48 examples in all)."""
    name = data.draw(st.sampled_from(goldens.fixtures), label="fixture")
    engine = candidate_engines(name)
    # within max_position_embeddings: past it dynamic NTK differs by design
    ids, cuts = data.draw(_cases(min(32, engine.config.max_position_embeddings)), label="case")
    full = engine.logits(ids)
    cache = engine.new_cache(1, len(ids) + 3)
    chunks = [engine.forward(piece[None], cache)[0] for piece in np.split(ids, cuts)]
    assert cache.length == len(ids)
    np.testing.assert_allclose(np.concatenate(chunks).astype(np.float64), full.astype(np.float64), rtol=0,
                               atol=candidate.golden_atol)


def test_padded_batch_matches_single_sequences(candidate, candidate_engines, goldens):
    """Two prompts of different lengths in one left-padded batch: each row's logits are its own."""
    name = "llama32" if "llama32" in goldens.fixtures else goldens.fixtures[0]
    engine = candidate_engines(name)
    a, b = np.arange(3, 12), np.arange(20, 25)
    ids = np.zeros((2, len(a)), np.int64)
    ids[0], ids[1, len(a) - len(b):] = a, b
    mask = (np.arange(len(a))[None] >= np.array([[0], [len(a) - len(b)]])).astype(np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    out = engine.forward(ids, engine.new_cache(2, len(a)), attention_mask=mask, positions=positions)
    atol = candidate.golden_atol
    np.testing.assert_allclose(out[0].astype(np.float64), engine.logits(a).astype(np.float64), rtol=0, atol=atol)
    np.testing.assert_allclose(out[1, len(a) - len(b):].astype(np.float64), engine.logits(b).astype(np.float64),
                               rtol=0, atol=atol)


# ---------------------------------------------------------------- quantized checkpoints (tests/fixtures/quant/)


# W8A8 (int8 codes of the input), asymmetric 4-bit groups, and GPTQ act-order (a column permutation): the other
# quantized fixtures reach the same kernels with other widths and group sizes, which the op tests cover.
DECODE_FIXTURES = ("tiny-w8a8", "tiny-w4a16-g32-asym", "tiny-gptq-w4g32-actorder")


def test_quantized_fixture_logits(candidate, candidate_engines, goldens, quant_name):
    """Each tiny quantized checkpoint against its golden (the bounds of refllama.testing.golden): weight-only and
    float checkpoints against the exact function of the checkpoint (2e-5; float64 also 1e-12 against HF's true
    float64 where stored); W8A8 with vLLM's semantics 2e-5, with compressed-tensors' within the tie bound; in half
    precision the half bounds of the quantized fixtures. Then, for the weight layouts whose decode kernels differ
    (DECODE_FIXTURES), the last two tokens of prompt b decoded one at a time through the cache give the full
    forward's logits, within the golden bound of the dtype (per-token activation scales do not depend on other
    tokens, so W8A8 too)."""
    g = goldens.quant_golden(quant_name)
    engine = candidate_engines(quant_name)
    w8a8 = quant_name == "tiny-w8a8"
    for prompt in ("a", "b"):
        ids = g[f"ids_{prompt}"]
        ours = engine.logits(ids)
        assert ours.dtype == candidate.dtype
        if candidate.half:
            atol = W8A8_HALF_ATOL if w8a8 else QUANT_HALF_ATOL[candidate.spec.dtype]
            np.testing.assert_allclose(ours.astype(np.float32), g[reference_key(g, prompt)], rtol=0, atol=atol)
        elif w8a8:
            ref = g[f"logits_{prompt}"]
            assert np.abs(ours - ref).max() < W8A8_HF_ATOL
            assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= W8A8_HF_TOP1
            assert_close(candidate_engines(quant_name, "vllm").logits(ids), g[f"logits_{prompt}_int8vllm"], F32_ATOL)
        else:
            assert_close(ours, g[reference_key(g, prompt)], F32_ATOL)  # the references are float32
            if candidate.data_type is DataType.F64 and f"logits_{prompt}_f64pure" in g:
                np.testing.assert_allclose(ours, g[f"logits_{prompt}_f64pure"], rtol=0, atol=F64_ATOL)
    if quant_name in DECODE_FIXTURES:
        decoded = decode_rows(engine, ids, prefill=len(ids) - 2)
        np.testing.assert_allclose(decoded.astype(np.float64), ours.astype(np.float64), rtol=0,
                                   atol=candidate.golden_atol)


__all__ = ["Candidate", "accepts", "block_types", "candidate", "candidate_engines", "goldens",
           "pytest_generate_tests", *(name for name in dict(globals()) if name.startswith("test_"))]
