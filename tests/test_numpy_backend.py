"""Op-level checks of the reference backend against independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refllama.backends import get_backend
from refllama.config import ActivationType
from refllama.dtypes import DataType


@given(st.integers(1, 2), st.sampled_from([(4, 4), (4, 2), (6, 3), (8, 1)]), st.integers(1, 5), st.integers(0, 4),
       st.integers(0, 2**32 - 1))
def test_gqa_equals_mha_with_repeated_kv_heads(batch, heads, T, past, seed):
    H, KV = heads
    D = 8
    S = past + T
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, H, T, D))
    k, v = rng.standard_normal((2, batch, KV, S, D))
    mask = np.arange(S)[None, :] <= (past + np.arange(T))[:, None]
    mask = np.broadcast_to(mask, (batch, T, S))
    xp = get_backend("numpy", DataType.F64)
    gqa = xp.attention(q, k, v, mask)
    rep = H // KV
    k_rep, v_rep = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # head h -> kv head h // rep
    assert np.allclose(xp.attention(q, k_rep, v_rep, mask), gqa, rtol=0, atol=1e-13)
    # and against the textbook formula, head by head
    for h in range(H):
        s = q[:, h] @ k[:, h // rep].swapaxes(-1, -2) / math.sqrt(D)
        s = np.where(mask, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(gqa[:, h], p @ v[:, h // rep], rtol=0, atol=1e-13)


@pytest.mark.parametrize("act,reference", [
    (ActivationType.Silu, lambda x: x / (1 + math.exp(-x))),
    (ActivationType.Swish, lambda x: x / (1 + math.exp(-x))),
    (ActivationType.Gelu, lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2)))),
    (ActivationType.GeluTanh, lambda x: 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
    (ActivationType.Relu, lambda x: max(x, 0.0)),
])
def test_gated_activations(act, reference):
    xp = get_backend("numpy", DataType.F64)
    gate = np.linspace(-6, 6, 101)
    up = np.linspace(2, -1, 101)
    expected = np.array([reference(g) * u for g, u in zip(gate, up, strict=True)])
    np.testing.assert_allclose(xp.gated_activation(gate, up, act), expected, rtol=1e-14, atol=1e-15)


def test_rms_norm_and_rope():
    xp = get_backend("numpy", DataType.F64)
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 3, 16)), rng.standard_normal(16)
    expected = w * x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(xp.rms_norm(x, w, 1e-5), expected, rtol=1e-14)
    # RoPE rotates each pair (i, i + D/2) by its angle: norms of the pairs are preserved.
    q = rng.standard_normal((1, 2, 3, 8))
    angles = rng.uniform(-3, 3, (1, 1, 3, 4))
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    out = xp.apply_rope(q, cos, sin)
    pair_norm = lambda a: np.hypot(a[..., :4], a[..., 4:])  # noqa: E731
    np.testing.assert_allclose(pair_norm(out), pair_norm(q), rtol=1e-13)
    np.testing.assert_allclose(out[..., 0], q[..., 0] * cos[..., 0] - q[..., 4] * sin[..., 0], rtol=1e-13)
