"""What only the MLX backend does: its cache buffers written in place, a lazy graph that does not grow across decode
steps, and SmolLM2 on MLX's CPU matmul.

Every operation in float32, float16 and bfloat16 and the golden fixtures, on this backend as on every other, are
the conformance suite's (refllama/testing/conformance.py, run by tests/test_conformance.py; measured values in
docs/mlx.md). SmolLM2 float32 against HF float32: 2e-4, as tests/test_smollm2.py (measured <= 1.1e-4).
"""

from __future__ import annotations

import io

import numpy as np
import pytest

import refllama
from refllama.backends import get_backend
from refllama.dtypes import DataType

from conftest import GOLDEN, assert_smollm2_logits, engine_cache, load_npz, smollm2_path

mx = pytest.importorskip("mlx.core")


@pytest.fixture(scope="module")
def mlx_engines():
    return engine_cache("mlx")


# ---------------------------------------------------------------- the cache buffers and the lazy graph


def _address(a: mx.array) -> int:
    """Where an array's data lives (bytes: bfloat16 has no buffer format); the views are dropped at once."""
    return np.asarray(memoryview(a.view(mx.uint8))).__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", [DataType.F32, DataType.F16, DataType.BF16])
def test_cache_write_writes_in_place(dtype):
    """The KV cache buffer is written where it lies (one address throughout), never copied per step."""
    xp = get_backend("mlx", dtype)
    buffer = xp.zeros((2, 3, 10, 4))
    address = _address(buffer)
    for start, T in [(0, 3), (3, 1), (4, 5)]:
        values = np.random.default_rng(start).standard_normal((2, 3, T, 4)).astype(dtype.numpy_dtype)
        assert xp.cache_write(buffer, xp.asarray(values), start) is buffer
        assert _address(buffer) == address


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
