from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# The golden bounds and checks, one set for every backend (refllama/testing/golden.py), for the test modules here.
from refllama.testing.golden import (  # noqa: F401
    ARGMAX_MARGIN,
    F32_ATOL,
    F64_ATOL,
    HALF_ATOL,
    SMOLLM2_ATOL,
    assert_close,
    assert_smollm2_logits,
    decode_rows,
    top2_margin,
)

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
