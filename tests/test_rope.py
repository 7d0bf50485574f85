from __future__ import annotations

import math

import numpy as np

from refllama.config import LlamaConfig
from refllama.model import rope

from test_config import LLAMA_31_8B_INSTRUCT, TINYLLAMA_CHAT


def test_default_table():
    c = LlamaConfig.from_dict(TINYLLAMA_CHAT)
    expected = [1 / 10000 ** (2 * i / 64) for i in range(32)]
    np.testing.assert_allclose(rope.inv_freq(c), expected, rtol=1e-15)


def test_llama3_table_regimes():
    """High frequencies untouched, low ones divided by factor, the band between interpolated (Llama 3.1 8B)."""
    c = LlamaConfig.from_dict(LLAMA_31_8B_INSTRUCT)
    base = rope.inv_freq(LlamaConfig.from_dict({**LLAMA_31_8B_INSTRUCT, "rope_scaling": None}))
    scaled = rope.inv_freq(c)
    wavelen = 2 * math.pi / base
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    mid = ~high & ~low
    assert high.any() and low.any() and mid.any()
    np.testing.assert_array_equal(scaled[high], base[high])
    np.testing.assert_allclose(scaled[low], base[low] / 8, rtol=1e-15)
    assert np.all((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 8))


def test_linear_and_dynamic_tables():
    linear = LlamaConfig.from_dict({**TINYLLAMA_CHAT, "rope_scaling": {"type": "linear", "factor": 4.0}})
    plain = LlamaConfig.from_dict(TINYLLAMA_CHAT)
    np.testing.assert_allclose(rope.inv_freq(linear), rope.inv_freq(plain) / 4, rtol=1e-15)
    dyn = LlamaConfig.from_dict({**TINYLLAMA_CHAT, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    np.testing.assert_array_equal(rope.inv_freq(dyn, 2048), rope.inv_freq(plain))
    longer = rope.inv_freq(dyn, 4096)
    d = 64
    base = 10000 * (2 * 4096 / 2048 - 1) ** (d / (d - 2))
    np.testing.assert_allclose(longer, [1 / base ** (2 * i / d) for i in range(32)], rtol=1e-14)


def test_cos_sin_layout():
    c = LlamaConfig.from_dict(TINYLLAMA_CHAT)
    cos, sin = rope.cos_sin(c, np.array([[0, 5]]))
    assert cos.shape == (1, 2, 64)
    np.testing.assert_array_equal(cos[0, 0], 1.0)
    np.testing.assert_allclose(sin[0, 1, :32], np.sin(5 * rope.inv_freq(c)), rtol=1e-15)
    np.testing.assert_array_equal(sin[0, 1, :32], sin[0, 1, 32:])  # rotate-half: cat(freqs, freqs)
