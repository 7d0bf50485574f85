"""Quantized Linears on the MLX backend: what MLX does its own way (its dequantization, its affine form for
mx.quantized_matmul, its W8A8 codes and blocked int8 sums), op by op against the reference arithmetic
(refllama/quant). The quantized Linears and the tiny quantized checkpoints in float32, bfloat16 and float16 are
the conformance suite's (refllama/testing/conformance.py, run by tests/test_conformance.py; measured in docs/mlx.md:
float32 <= 9.0e-6 against the goldens, the numpy backend's <= 5.2e-6; bfloat16 / float16 <= 0.12 / 0.015; W8A8 in
half precision <= 0.25).

* W8A8's layer-0 intermediates from HF's own input, exactly; greedy generation equals the numpy backend's.
* Dequantization in MLX ops equals refllama.quant.types.dequantize bit for bit, for every fixture Linear and for
  synthetic weights over every width 1..8, group layout, zero point and g_idx, in float32, bfloat16 and float16.
* mx.quantized_matmul (the float32 path where MLX's affine form holds the weight) against x @ dequantize(W).T:
  8 eps32 * max|ref|, the op bound of the conformance suite (measured: bit-identical on the CPU).
* W8A8: codes and token scales equal refllama/quant/int8.py's bit for bit (ties, zero rows), the accumulators
  exactly (including K > 1024, where one float32 matmul would round), the float32 outputs bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import ml_dtypes
import numpy as np
import pytest

import refllama
from refllama.backends import get_backend
from refllama.dtypes import DataType
from refllama.errors import BackendError
from refllama.formats.checkpoint import quantized_linears
from refllama.model.weights import Linear
from refllama.quant import ActivationQuant, Int8Weight, PackedIntWeight, dequantize
from refllama.quant import int8 as ref_int8
from refllama.quant.packing import pack_rows

from conftest import GOLDEN, QUANT_NAMES, ROOT, quant_engine, quant_golden

mx = pytest.importorskip("mlx.core")
mlx_backend = pytest.importorskip("refllama.backends.mlx_backend")

WEIGHT_ONLY = [n for n in QUANT_NAMES if n != "tiny-w8a8"]
ALL_TYPES = [DataType.F32, DataType.BF16, DataType.F16]


def mlx_engine(name: str, dtype: str = "float32", semantics: str = "hf") -> refllama.GenericLlamaEngine:
    return quant_engine(name, "mlx", dtype, semantics)


# ---------------------------------------------------------------- the quantized fixtures


def test_w8a8_layer0_from_hfs_input_exactly():
    """HF's own layer-0 q_proj input: codes, token scales and int32 accumulators equal; outputs as the reference."""
    g = quant_golden("tiny-w8a8")
    weight = mlx_engine("tiny-w8a8").model.weights.layers[0].self_attention.q_proj.weight
    x = mx.array(g["l0_q_proj_x_a"])
    codes, scale = mlx_backend.quantize_tokens_hf(x)
    np.testing.assert_array_equal(np.array(codes), g["l0_q_proj_ct_codes_a"].astype(np.float32))
    np.testing.assert_array_equal(np.array(scale), g["l0_q_proj_ct_scale_a"])
    codes, scale = mlx_backend.quantize_tokens_vllm(x)
    np.testing.assert_array_equal(np.array(codes), g["l0_q_proj_vllm_codes_a"].astype(np.float32))
    np.testing.assert_array_equal(np.array(scale), g["l0_q_proj_vllm_scale_a"])
    acc = mlx_backend.int8_accumulate(codes, weight.q)
    np.testing.assert_array_equal(np.array(acc).astype(np.int32), g["l0_q_proj_vllm_acc_a"])
    vllm = replace(weight, activation=ActivationQuant("vllm"))
    np.testing.assert_array_equal(np.array(mlx_backend.w8a8_matmul(x, vllm)), g["l0_q_proj_y_vllm_a"])
    y = np.array(mlx_backend.w8a8_matmul(x, weight))  # integer domain vs HF's float fake-quant: float32 rounding
    np.testing.assert_allclose(y, g["l0_q_proj_y_hf_a"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-w4a16-g32", "tiny-gptq-w4g32-actorder"])
def test_greedy_generation_matches_the_numpy_backend(name):
    g = quant_golden(name)
    ours = mlx_engine(name).generate_ids(g["ids_a"], max_new_tokens=8, stop_at_eos=False)
    assert ours == quant_engine(name).generate_ids(g["ids_a"], max_new_tokens=8, stop_at_eos=False)


def test_paths_taken_per_fixture():
    """Weight-only fixtures run through mx.quantized_matmul, except GPTQ act-order (g_idx), which dequantizes."""
    for name in WEIGHT_ONLY:
        weights = quantized_linears(mlx_engine(name).model.weights)
        forms = [mlx_backend.affine_form(w) is not None for w in weights]
        assert all(forms) if name != "tiny-gptq-w4g32-actorder" else not any(forms), name


# ---------------------------------------------------------------- dequantization, bit for bit


def to_mlx(weight, xp):
    """What the engine does (WeightMap.map): every array field through the backend's asarray."""
    return replace(weight, **{f.name: xp.asarray(getattr(weight, f.name)) for f in fields(weight)
                              if isinstance(getattr(weight, f.name), np.ndarray)})


def raw(a: np.ndarray) -> np.ndarray:
    """The bytes of an array (bit-for-bit comparisons that also tell -0.0 from 0.0 and work for bfloat16)."""
    return np.ascontiguousarray(a).view(np.uint8)


def to_compute(weight, np_dtype):
    """The host weight with its scale rounded to the compute dtype, as asarray rounds it for MLX."""
    return replace(weight, scale=np.asarray(weight.scale).astype(np_dtype))


@pytest.mark.parametrize("name", [n for n in QUANT_NAMES if n != "tiny-llama-bf16"])
def test_dequantize_equals_the_reference_for_every_fixture_linear(name):
    ours = quantized_linears(mlx_engine(name).model.weights)
    ref = quantized_linears(quant_engine(name).model.weights)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(np.array(mlx_backend.dequantize(a)), dequantize(b))
    g = quant_golden(name)
    attention = mlx_engine(name).model.weights.layers[0].self_attention
    for proj in ("q_proj", "k_proj"):
        w = mlx_backend.dequantize(getattr(attention, proj).weight)
        np.testing.assert_array_equal(np.array(w), g[f"dequant_l0_{proj}"])


SCALE_TYPES = [ml_dtypes.bfloat16, np.float16, np.float32]
# (bits, in_features, group_size, asymmetric, g_idx, per-tensor): every width, whole and ragged groups,
# per channel, per tensor, act-order.
PACKED_CASES = [(b, 96, 32, False, False, False) for b in range(1, 9)] + [
    (b, 100, 24, True, False, False) for b in (3, 4, 5, 7, 8)] + [
    (4, 128, None, True, False, False), (6, 64, None, False, False, False), (8, 64, None, False, False, True),
    (4, 128, 32, True, True, False), (3, 96, 32, False, True, False), (2, 256, 128, True, False, False)]


def packed_weight(rng, bits, n, group_size, asym, act_order, per_tensor, scale_type, out=24):
    codes = rng.integers(0, 1 << bits, (out, n))
    groups = 1 if group_size is None else -(-n // group_size)
    scale = (rng.uniform(0.5, 2, (1, 1) if per_tensor else (out, groups)) * 0.01).astype(scale_type)
    zero = rng.integers(0, 1 << bits, scale.shape).astype(np.int32) if asym else None
    g_idx = rng.permutation(np.arange(n) // group_size).astype(np.int32) if act_order else None
    return PackedIntWeight(pack_rows(codes, bits), scale, bits, n, zero, group_size, g_idx)


INT8_CASES = [(96, None, False, False), (96, 32, True, False), (100, 24, True, False), (96, 32, False, True),
              (64, None, True, False)]


def int8_weight(rng, n, group_size, asym, act_order, scale_type, out=24, activation=None):
    q = rng.integers(-128, 128, (out, n)).astype(np.int8)
    groups = 1 if group_size is None else -(-n // group_size)
    scale = (rng.uniform(0.5, 2, (out, groups)) * 0.01).astype(scale_type)
    zero = rng.integers(-128, 128, scale.shape).astype(np.int8) if asym else None
    g_idx = rng.permutation(np.arange(n) // group_size).astype(np.int32) if act_order else None
    return Int8Weight(q, scale, zero, group_size, g_idx, activation)


def synthetic_weights(seed):
    rng = np.random.default_rng(seed)
    for scale_type in SCALE_TYPES:
        for case in PACKED_CASES:
            yield packed_weight(rng, *case, scale_type)
        for case in INT8_CASES:
            yield int8_weight(rng, *case, scale_type)


@pytest.mark.parametrize("dtype", ALL_TYPES)
def test_dequantize_equals_the_reference_bit_for_bit(dtype):
    xp = get_backend("mlx", dtype)
    for weight in synthetic_weights(0):
        ref = dequantize(to_compute(weight, dtype.numpy_dtype), dtype.numpy_dtype)
        ours = xp.to_numpy(mlx_backend.dequantize(to_mlx(weight, xp), xp.mx_dtype))
        assert ours.dtype == ref.dtype
        np.testing.assert_array_equal(raw(ours), raw(ref), err_msg=repr(weight))


def test_unpack_rows_reads_every_width_and_length():
    rng = np.random.default_rng(1)
    for bits in range(1, 9):
        for n in (1, 7, 31, 32, 33, 95, 128):
            codes = rng.integers(0, 1 << bits, (3, n))
            ours = mlx_backend.unpack_rows(mx.array(pack_rows(codes, bits)), bits, n)
            np.testing.assert_array_equal(np.array(ours), codes, err_msg=f"{bits} bits, {n} codes")


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_weight_only_linear_matches_the_numpy_backend(dtype, bias):
    """backend.linear on every synthetic weight: float32 through mx.quantized_matmul where the affine form exists;
    halves dequantize to the compute dtype. Against the numpy backend (float32, or float64 for halves)."""
    xp = get_backend("mlx", dtype)
    ref = get_backend("numpy", DataType.F32 if dtype is DataType.F32 else DataType.F64)
    eps = float(ml_dtypes.finfo(dtype.numpy_dtype).eps)
    rng = np.random.default_rng(2)
    used_affine = 0
    for weight in synthetic_weights(3):
        n = weight.shape[1]
        x = rng.standard_normal((2, 5, n)).astype(dtype.numpy_dtype)
        b = rng.standard_normal(weight.shape[0]).astype(dtype.numpy_dtype) if bias else None
        host = to_compute(weight, dtype.numpy_dtype)
        if dtype is DataType.F32:
            expected = ref.linear(x, Linear(host, b))
        else:  # the weight the half path multiplies by (rounded once), then an exact float64 product
            w_half = dequantize(host, dtype.numpy_dtype).astype(np.float64)
            expected = x.astype(np.float64) @ w_half.T + (0 if b is None else b.astype(np.float64))
        layer = Linear(to_mlx(weight, xp), None if b is None else xp.asarray(b))
        used_affine += dtype is DataType.F32 and mlx_backend.affine_form(layer.weight) is not None
        out = xp.to_numpy(xp.linear(xp.asarray(x), layer))
        assert out.dtype == dtype.numpy_dtype and out.shape == expected.shape
        # float32: each backend's summation order (qmm measured bit-identical to x @ W.T on the CPU); halves: the
        # output rounding plus float32 accumulation, as tests/test_mlx_backend.py's test_linear
        factor = 8 if dtype is DataType.F32 else 2
        atol = factor * eps * np.abs(expected).max()
        np.testing.assert_allclose(out.astype(np.float64), expected, rtol=0, atol=atol, err_msg=repr(weight))
    if dtype is DataType.F32:
        assert used_affine == 3 * 14  # per scale type: 11 packed cases and 3 int8 cases have an affine form


def test_affine_form_only_where_mlx_can_hold_the_weight():
    rng = np.random.default_rng(4)
    xp = get_backend("mlx")
    has = {True: [], False: []}
    for case in PACKED_CASES:
        weight = to_mlx(packed_weight(rng, *case, ml_dtypes.bfloat16), xp)
        has[mlx_backend.affine_form(weight) is not None].append((*case[:3], case[4]))
    assert sorted(has[False]) == sorted([(7, 96, 32, False)] + [(b, 100, 24, False) for b in (3, 4, 5, 7, 8)] + [
        (4, 128, 32, True), (3, 96, 32, True)])  # 7 bits, groups of 24 (and ragged rows), act-order
    for bits in (4, 8):  # MLX's own quantization round-trips through our packing: the same bit stream
        w = mx.array(rng.standard_normal((16, 128)).astype(np.float32))
        words, scales, biases = mx.quantize(w, group_size=64, bits=bits)
        ours = mlx_backend.unpack_rows(words.view(mx.int32), bits, 128).astype(mx.float32)
        np.testing.assert_array_equal(np.array(ours * mx.repeat(scales, 64, axis=1) + mx.repeat(biases, 64, axis=1)),
                                      np.array(mx.dequantize(words, scales, biases, group_size=64, bits=bits)))


def test_quantized_matmul_holds_symmetric_and_asymmetric_weights_exactly():
    """With bfloat16/float16 scales MLX's w = scale * u + bias is (u - zero) * scale exactly: the dequantized
    weight of the affine form equals the reference's bit for bit."""
    rng = np.random.default_rng(5)
    xp = get_backend("mlx")
    for scale_type in (ml_dtypes.bfloat16, np.float16):
        for case in PACKED_CASES:
            weight = to_mlx(packed_weight(rng, *case, scale_type), xp)
            form = mlx_backend.affine_form(weight)
            if form is not None:
                words, scales, biases, group_size, bits = form
                w = mx.dequantize(words, scales, biases, group_size=group_size, bits=bits)
                np.testing.assert_array_equal(np.array(w), np.array(mlx_backend.dequantize(weight)), repr(case))
        for case in INT8_CASES:
            weight = to_mlx(int8_weight(rng, *case, scale_type), xp)
            form = mlx_backend.affine_form(weight)
            if form is not None:
                words, scales, biases, group_size, bits = form
                w = mx.dequantize(words, scales, biases, group_size=group_size, bits=bits)
                np.testing.assert_array_equal(np.array(w), np.array(mlx_backend.dequantize(weight)), repr(case))


# ---------------------------------------------------------------- W8A8 op by op


def token_rows(rng, dtype, k=96, m=40):
    """Rows with negative absmax elements (the -127.5 tie), positive ones, an all-zero row and tiny values."""
    x = rng.standard_normal((m, k)) * rng.uniform(0.01, 10, (m, 1))
    x[::2, 0] = -np.abs(x[::2]).max(axis=1) * 1.5  # negative absmax: lands on -127.5
    x[1::4, 3] = np.abs(x[1::4]).max(axis=1) * 2  # positive absmax: 127.5, clamped to 127
    x[5] = 0
    x[7] *= 1e-30
    return x.astype(dtype)


def reference_tokens_hf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """refllama.quant.int8.quantize_tokens_hf; for bfloat16 the same lines with ml_dtypes.finfo (np.finfo does not
    know ml_dtypes' bfloat16, and the numpy backend never computes in it)."""
    if x.dtype != ml_dtypes.bfloat16:
        return ref_int8.quantize_tokens_hf(x)
    absmax = np.max(np.abs(x), axis=-1, keepdims=True)
    scale = absmax / x.dtype.type(127.5)
    scale = np.where(scale == 0, ml_dtypes.finfo(x.dtype).eps, scale).astype(x.dtype)
    return np.rint(np.clip(x / scale, -128, 127)).astype(np.int8), scale


@pytest.mark.parametrize("dtype", ALL_TYPES)
def test_token_codes_and_scales_equal_the_reference(dtype):
    xp = get_backend("mlx", dtype)
    x = token_rows(np.random.default_rng(6), dtype.numpy_dtype)
    for ours_fn, ref_fn in ((mlx_backend.quantize_tokens_hf, reference_tokens_hf),
                            (mlx_backend.quantize_tokens_vllm, ref_int8.quantize_tokens_vllm)):
        codes, scale = ours_fn(xp.asarray(x))
        ref_codes, ref_scale = ref_fn(x)
        np.testing.assert_array_equal(np.array(codes), ref_codes.astype(np.float32))
        ours_scale = xp.to_numpy(scale)
        assert ours_scale.dtype == ref_scale.dtype
        np.testing.assert_array_equal(raw(ours_scale), raw(ref_scale))
    ties = np.array(mlx_backend.quantize_tokens_hf(xp.asarray(x))[0])[::2, 0]
    assert set(ties) <= {-128, -127} and -128 in ties  # the tie is really exercised


@pytest.mark.parametrize("K", [1, 100, 1024, 1025, 3000])
def test_int8_accumulators_are_exact(K):
    """Past K = 1024 a single float32 matmul would round (|acc| up to K * 2**14 > 2**24): blocks keep it exact."""
    rng = np.random.default_rng(K)
    a = rng.integers(-128, 128, (6, K)).astype(np.int8)
    w = rng.integers(-128, 128, (5, K)).astype(np.int8)
    a[0], w[0] = -128, -128  # the largest accumulator: K * 2**14
    a[1], w[1] = -128, 127  # the most negative
    a[2], w[2] = rng.integers(100, 128, K), rng.integers(100, 128, K)  # large sums of odd-valued products
    a[3], w[3] = rng.integers(100, 128, K), -rng.integers(100, 128, K)
    acc = np.array(mlx_backend.int8_accumulate(mx.array(a.astype(np.float32)), mx.array(w)))
    np.testing.assert_array_equal(acc.astype(np.int64), a.astype(np.int64) @ w.astype(np.int64).T)
    np.testing.assert_array_equal(acc.astype(np.int32), ref_int8.int8_accumulate(a, w))
    if K == 3000:  # these rows do need the blocks: one float32 matmul over them rounds
        single = np.array(mx.array(a.astype(np.float32)) @ mx.array(w.astype(np.float32)).T)
        assert not np.array_equal(single.astype(np.int64), a.astype(np.int64) @ w.astype(np.int64).T)


def test_int8_accumulator_overflow_is_refused():
    K = ref_int8.INT8_MAX_K + 1
    with pytest.raises(BackendError, match="overflows"):
        mlx_backend.int8_accumulate(mx.zeros((1, K)), mx.zeros((1, K), dtype=mx.int8))


@pytest.mark.parametrize("semantics", ["hf", "vllm"])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("K", [96, 1500])
def test_w8a8_float32_equals_the_reference_bit_for_bit(semantics, per_tensor, K):
    rng = np.random.default_rng(K)
    xp = get_backend("mlx")
    weight = int8_weight(rng, K, None, False, False, ml_dtypes.bfloat16, out=40,
                         activation=ActivationQuant(semantics))
    if per_tensor:
        weight = replace(weight, scale=weight.scale[:1, :1])
    x = token_rows(rng, np.float32, K, m=12).reshape(3, 4, K)
    host = to_compute(weight, np.float32)
    expected = ref_int8.w8a8_matmul(x, host.q, host.scale, semantics)
    bias = rng.standard_normal(40).astype(np.float32)
    ours = xp.to_numpy(xp.linear(xp.asarray(x), Linear(to_mlx(weight, xp), xp.asarray(bias))))
    np.testing.assert_array_equal(ours, expected + bias)
    np.testing.assert_array_equal(ours, get_backend("numpy").linear(x, Linear(host, bias)))


@pytest.mark.parametrize("dtype", [DataType.BF16, DataType.F16])
@pytest.mark.parametrize("semantics", ["hf", "vllm"])
def test_w8a8_half_precision_rounds_a_float32_epilogue_once(dtype, semantics):
    rng = np.random.default_rng(8)
    xp = get_backend("mlx", dtype)
    weight = int8_weight(rng, 128, None, False, False, ml_dtypes.bfloat16, out=40,
                         activation=ActivationQuant(semantics))
    x = token_rows(rng, dtype.numpy_dtype, 128, m=12)
    quantize = reference_tokens_hf if semantics == "hf" else ref_int8.quantize_tokens_vllm
    codes, xs = quantize(x)
    acc = ref_int8.int8_accumulate(codes, weight.q).astype(np.float32)
    ws = np.asarray(weight.scale).astype(dtype.numpy_dtype).astype(np.float32).reshape(1, -1)
    xs = xs.astype(np.float32)
    y = (acc * ws) * xs if semantics == "hf" else xs * (ws * acc)
    ours = xp.to_numpy(xp.linear(xp.asarray(x), Linear(to_mlx(weight, xp), None)))
    assert ours.dtype == dtype.numpy_dtype
    np.testing.assert_array_equal(raw(ours), raw(y.astype(dtype.numpy_dtype)))


# ---------------------------------------------------------------- what the backend cannot run


@dataclass(frozen=True, eq=False)
class Fp8BlockWeight:
    """A quantized weight type the backend does not know (as a GGUF block weight would be: the mlx backend does
    not list them in `reads_as_stored`, so the engine never hands it one)."""

    data: object
    scale: object


def test_unsupported_weights_raise_a_backend_error_naming_them():
    xp = get_backend("mlx")
    x = xp.asarray(np.ones((1, 64), np.float32))
    unknown = Fp8BlockWeight(xp.asarray(np.zeros((4, 64), np.uint8)), xp.asarray(np.ones((4, 1), np.float32)))
    with pytest.raises(BackendError, match="Fp8BlockWeight"):
        xp.linear(x, Linear(unknown, None))
    rng = np.random.default_rng(9)
    asym = int8_weight(rng, 64, None, True, False, np.float32, activation=ActivationQuant("hf"))
    with pytest.raises(BackendError, match="W8A8"):
        xp.linear(x, Linear(to_mlx(asym, xp), None))
    wide = replace(packed_weight(rng, 8, 64, 32, False, False, False, np.float32), bits=9)
    with pytest.raises(BackendError, match="9 bits"):
        xp.linear(x, Linear(to_mlx(wide, xp), None))


# ---------------------------------------------------------------- SmolLM2-135M W8A8 (K = 1536 > 1024: blocked sums)


@pytest.fixture(scope="module")
def smollm2_w8a8(tmp_path_factory):
    import sys

    import test_quant_smollm2

    test_quant_smollm2._smollm2()  # skips where SmolLM2 is not installed (never in CI)
    sys.path.insert(0, str(ROOT / "tools"))
    import make_quant_golden

    folder = make_quant_golden.write_refllama(tmp_path_factory.mktemp("smollm2_w8a8"))
    with np.load(GOLDEN / "quant_smollm2_w8a8.npz") as data:
        g = {k: data[k] for k in data.files}
    return refllama.load(folder, backend="mlx"), g


def test_smollm2_w8a8_within_the_numpy_backends_bounds(smollm2_w8a8):
    """tests/test_quant_smollm2.py's bounds (top-16 logits 6, KL 0.2, top-1 0.85: the -127.5 tie amplified by
    SmolLM2's outliers), on the chat prompt; measured 4.0 / 0.032 / 0.93 (numpy: 3.8 / 0.018 / 0.90)."""
    from test_quant_smollm2 import KL_MAX, TOP1_MIN, TOPK_ATOL

    engine, g = smollm2_w8a8
    weight = engine.model.weights.layers[0].self_attention.q_proj.weight
    codes, scale = mlx_backend.quantize_tokens_hf(mx.array(g["l0_q_proj_x"]))
    np.testing.assert_array_equal(np.array(codes), g["l0_q_proj_codes"].astype(np.float32))
    np.testing.assert_array_equal(np.array(scale), g["l0_q_proj_scale"])
    y = mlx_backend.w8a8_matmul(mx.array(g["l0_q_proj_x"]), weight)
    np.testing.assert_allclose(np.array(y), g["l0_q_proj_y"], rtol=0, atol=2e-5)

    logits = engine.logits(g["chat_ids"]).astype(np.float64)
    top_ids = g["chat_topk_ids"].astype(np.int64)
    assert np.abs(np.take_along_axis(logits, top_ids, -1) - g["chat_topk"]).max() < TOPK_ATOL
    assert (logits.argmax(-1) == top_ids[:, 0]).mean() >= TOP1_MIN
    ref = g["chat_logits"].astype(np.float64)
    log_p = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    ours = logits[g["chat_positions"]]
    log_q = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
    assert (np.exp(log_p) * (log_p - log_q)).sum(-1).max() < KL_MAX
