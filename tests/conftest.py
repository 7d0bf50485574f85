from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
GOLDEN = ROOT / "golden"

# CI: deterministic examples, bounded; "thorough" for longer local or nightly runs (--hypothesis-profile).
settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
FIXTURE_NAMES = sorted(MANIFEST["fixtures"])
LENGTHS = MANIFEST["sequence_lengths"]
QUANT = FIXTURES / "quant"  # tiny checkpoints made by the real quantization tools, each with its golden.npz
QUANT_NAMES = sorted(p.name for p in QUANT.iterdir() if p.is_dir())

# Bounds against the golden files, one set for every backend (measured figures: tests/test_golden.py,
# tests/test_quant_fixtures.py, tests/test_smollm2.py and each backend's docs).
F32_ATOL = 2e-5  # a float32 engine vs HF float32
F64_ATOL = 1e-12  # a float64 engine vs HF patched to true float64
ARGMAX_MARGIN = 1e-3  # argmax must agree where HF's top-1/top-2 margin exceeds this (below it float32 noise may flip)
HALF_ATOL = {"bfloat16": 0.1, "float16": 0.015}  # half-precision engines vs HF float32 (as far as HF's own)
SMOLLM2_ATOL = 2e-4  # SmolLM2 in float32 vs HF float32 on the same GGUF


def smollm2_path() -> Path:
    """The installed SmolLM2 GGUF (the embedded default); skip without it, except in CI, which installs it."""
    from refllama.errors import CheckpointError
    from refllama.formats.default_model import default_model_path

    try:
        return default_model_path()
    except CheckpointError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"SmolLM2 not installed ({e})")


@functools.cache
def smollm2_engine(dtype: str = "float32"):
    """SmolLM2 on the numpy backend, loaded once per test session (a load dequantizes the GGUF: ~3 s of CPU).
    Shared: a test must not change it (no set_precision, no batch_size)."""
    from refllama.engine import GenericLlamaEngine

    # the class method: tests that route refllama.load (or refllama.engine.load) to this cache patch those names
    return GenericLlamaEngine.load(smollm2_path(), backend="numpy", dtype=dtype)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def golden(name: str) -> dict[str, np.ndarray]:
    return load_npz(GOLDEN / f"{name}.npz")


def quant_golden(name: str) -> dict[str, np.ndarray]:
    return load_npz(QUANT / name / "golden.npz")


def top2_margin(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def assert_close(ours: np.ndarray, ref: np.ndarray, atol: float) -> np.ndarray:
    """Logits within atol of the reference, and the same argmax wherever its margin is clear; returns that mask."""
    np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)
    clear = top2_margin(ref) > ARGMAX_MARGIN
    np.testing.assert_array_equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])
    return clear


def decode_rows(engine, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits of `ids` from a prefill of `prefill` tokens, then one token at a time through the cache."""
    cache = engine.new_cache(1, len(ids))
    rows = [engine.forward(ids[None, :prefill], cache)[0]]
    rows += [engine.forward(ids[None, t:t + 1], cache)[0] for t in range(prefill, len(ids))]
    return np.concatenate(rows)


def assert_smollm2_logits(logits: np.ndarray, g: dict[str, np.ndarray], prompt: str) -> None:
    """SmolLM2 logits of a golden prompt (golden/smollm2.npz) against HF: the stored positions, every position's
    top-k entries, and the argmax where HF's top-1/top-2 margin is clear."""
    np.testing.assert_allclose(logits[g[f"{prompt}_positions"]], g[f"{prompt}_logits_f32"], rtol=0,
                               atol=SMOLLM2_ATOL)
    top_ids = g[f"{prompt}_topk_ids"].astype(np.int64)
    top = g[f"{prompt}_topk_f32"]
    np.testing.assert_allclose(np.take_along_axis(logits, top_ids, -1), top, rtol=0, atol=SMOLLM2_ATOL)
    clear = top[:, 0] - top[:, 1] > ARGMAX_MARGIN
    np.testing.assert_array_equal(logits.argmax(-1)[clear], top_ids[clear, 0])


def engine_cache(backend: str = "numpy"):
    """get(name, dtype="float32"): the golden fixture `name` loaded on `backend`, once per (name, dtype)."""
    import refllama

    cache: dict[tuple[str, str], refllama.GenericLlamaEngine] = {}

    def get(name: str, dtype: str = "float32") -> refllama.GenericLlamaEngine:
        if (name, dtype) not in cache:
            cache[name, dtype] = refllama.load(FIXTURES / name, backend=backend, dtype=dtype)
        return cache[name, dtype]

    return get


@functools.cache
def quant_engine(name: str, backend: str = "numpy", dtype: str = "float32", semantics: str = "hf"):
    """The quantized fixture `name` on `backend`, W8A8 activations quantized with `semantics` (loaded once)."""
    import refllama

    return refllama.load(QUANT / name, backend=backend, dtype=dtype, quant_semantics=semantics)


@pytest.fixture(scope="session")
def engines():
    """Engines on the numpy backend, cached per (fixture, dtype)."""
    return engine_cache("numpy")
