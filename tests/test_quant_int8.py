"""W8A8 in the integer domain: property tests against independent int64 / scalar computations.

The int32 accumulators must equal an int64 NumPy sum of products bit for bit (int8_accumulate runs float64 BLAS,
exact while K * 2**14 < 2**53); the activation codes must follow each semantics' formula element by element
(re-derived here with scalar float32 arithmetic), including -128 codes, the -127.5 tie and all-zero rows.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refllama.errors import BackendError
from refllama.quant.int8 import INT8_MAX_K, int8_accumulate, quantize_tokens_hf, quantize_tokens_vllm, w8a8_matmul

PATTERNS = ("random", "extremes", "all_min", "zeros", "mixed")


def _int8(rng: np.random.Generator, shape: tuple[int, ...], pattern: str) -> np.ndarray:
    if pattern == "random":
        return rng.integers(-128, 128, shape).astype(np.int8)
    if pattern == "extremes":
        return rng.choice(np.array([-128, -127, 127], np.int8), shape)
    if pattern == "all_min":
        return np.full(shape, -128, np.int8)
    if pattern == "zeros":
        return np.zeros(shape, np.int8)
    a = rng.integers(-128, 128, shape).astype(np.int8)
    a[..., ::3] = -128
    return a


def _int64_reference(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (a.astype(np.int64)[:, None, :] * w.astype(np.int64)[None, :, :]).sum(-1)


@given(m=st.integers(1, 9), n=st.integers(1, 9), k=st.integers(1, 700), seed=st.integers(0, 2**32 - 1),
       pa=st.sampled_from(PATTERNS), pw=st.sampled_from(PATTERNS))
def test_int32_accumulators_equal_an_int64_computation(m, n, k, seed, pa, pw):
    rng = np.random.default_rng(seed)
    a, w = _int8(rng, (m, k), pa), _int8(rng, (n, k), pw)
    acc = int8_accumulate(a, w)
    assert acc.dtype == np.int32 and acc.shape == (m, n)
    np.testing.assert_array_equal(acc.astype(np.int64), _int64_reference(a, w))


def test_accumulator_is_exact_at_the_int32_limit():
    """K = 131071 codes of -128 * -128: 2**31 - 2**14, the largest sum an int32 accumulator must hold."""
    a = np.full((1, INT8_MAX_K), -128, np.int8)
    acc = int8_accumulate(a, a)
    assert int(acc[0, 0]) == INT8_MAX_K * 128 * 128 == 2**31 - 2**14
    a[0, ::2] = 127  # alternating signs exercise cancellation at full size
    b = a[:, ::-1].copy()
    np.testing.assert_array_equal(int8_accumulate(a, b).astype(np.int64), _int64_reference(a, b))
    with pytest.raises(BackendError, match="overflows"):
        int8_accumulate(np.zeros((1, INT8_MAX_K + 1), np.int8), np.zeros((1, INT8_MAX_K + 1), np.int8))
    with pytest.raises(BackendError, match="int8"):
        int8_accumulate(a.astype(np.int16), a)


def _rows(draw_seed: int, m: int, k: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(draw_seed)
    x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 50, (m, 1))).astype(np.float32)
    if kind == "negative_absmax":  # every row's largest magnitude is negative: the -127.5 tie
        i = np.abs(x).argmax(-1)
        x[np.arange(m), i] = -np.abs(x[np.arange(m), i])
    elif kind == "zero_rows":
        x[::2] = 0
    elif kind == "outlier":
        x[:, 0] = 1e4
    return x


def _rint(v: float) -> float:
    return float(np.rint(np.float32(v)))


@given(m=st.integers(1, 6), k=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       kind=st.sampled_from(["gauss", "negative_absmax", "zero_rows", "outlier"]))
def test_hf_codes_follow_compressed_tensors_formula(m, k, seed, kind):
    x = _rows(seed, m, k, kind)
    codes, scale = quantize_tokens_hf(x)
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (m, 1)
    for r in range(m):
        absmax = np.float32(np.abs(x[r]).max())
        s = absmax / np.float32(127.5) if absmax else np.finfo(np.float32).eps
        assert scale[r, 0] == np.float32(s)
        expected = [min(max(_rint(np.float32(v) / np.float32(s)), -128), 127) for v in x[r]]
        assert codes[r].tolist() == expected
        j = int(np.abs(x[r]).argmax())
        if absmax and x[r, j] > 0:
            assert codes[r, j] == 127  # +127.5 rounds to 128, clamped
        elif absmax:
            assert codes[r, j] in (-128, -127)  # the tie: decided by the last bit of the scale


@given(m=st.integers(1, 6), k=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       kind=st.sampled_from(["gauss", "negative_absmax", "zero_rows", "outlier"]))
def test_vllm_codes_follow_the_kernel_formula(m, k, seed, kind):
    x = _rows(seed, m, k, kind)
    codes, scale = quantize_tokens_vllm(x)
    for r in range(m):
        absmax = np.float32(np.abs(x[r]).max())
        assert scale[r, 0] == absmax / np.float32(127)
        if not absmax:
            assert not codes[r].any()  # scale 0, codes 0, output 0
            continue
        inverse = np.float32(127) / absmax
        assert codes[r].tolist() == [min(max(_rint(np.float32(v) * inverse), -128), 127) for v in x[r]]
        assert abs(int(codes[r, int(np.abs(x[r]).argmax())])) == 127  # never a tie
    assert codes.min() >= -127


@given(m=st.integers(1, 5), n=st.integers(1, 7), k=st.integers(1, 200), seed=st.integers(0, 2**32 - 1),
       semantics=st.sampled_from(["hf", "vllm"]))
def test_w8a8_matmul_is_the_integer_product_then_the_scales(m, n, k, seed, semantics):
    rng = np.random.default_rng(seed)
    x = _rows(seed, m, k, "gauss")
    x[0] = 0  # an all-zero token gives an all-zero output in both semantics
    w_q = _int8(rng, (n, k), "mixed")
    w_scale = rng.uniform(1e-4, 1e-2, (n, 1)).astype(np.float32)
    y = w8a8_matmul(x, w_q, w_scale, semantics)
    codes, xs = (quantize_tokens_hf if semantics == "hf" else quantize_tokens_vllm)(x)
    acc = _int64_reference(codes, w_q).astype(np.float32)
    if semantics == "vllm":  # vLLM's epilogue, bit for bit
        np.testing.assert_array_equal(y, xs * (w_scale.reshape(1, -1) * acc))
    else:
        np.testing.assert_array_equal(y, (acc * w_scale.reshape(1, -1)) * xs)
    assert not y[0].any()
    # ... and both are HF's float fake-quant product up to float32 rounding
    qdq = (codes.astype(np.float64) * xs) @ (w_q.astype(np.float64) * w_scale).T
    np.testing.assert_allclose(y, qdq, rtol=2e-6, atol=1e-6 * max(1.0, float(np.abs(qdq).max())))


def test_float64_compute_keeps_the_activation_dtype():
    """In a float64 engine the "hf" scale is absmax / 127.5 in float64 (the activation dtype), so a tie can
    resolve differently from float32; vLLM's kernel is float32 whatever the engine computes in."""
    x = np.array([[-1.0, 0.5, 0.25]], np.float64)
    codes, scale = quantize_tokens_hf(x)
    assert scale.dtype == np.float64 and scale[0, 0] == 1.0 / 127.5 and codes[0, 0] == -128  # -127.5 -> even
    _, vscale = quantize_tokens_vllm(x)
    assert vscale.dtype == np.float32
