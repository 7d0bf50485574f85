from __future__ import annotations

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


def smollm2_path() -> Path:
    """The installed SmolLM2 GGUF (the embedded default); skip without it, except in CI, which installs it."""
    from refllama.default_model import default_model_path
    from refllama.errors import CheckpointError

    try:
        return default_model_path()
    except CheckpointError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"SmolLM2 not installed ({e})")


def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def engines():
    """Loaded engines, cached per (fixture, dtype)."""
    import refllama

    cache: dict[tuple[str, str], refllama.GenericLlamaEngine] = {}

    def get(name: str, dtype: str = "float32") -> refllama.GenericLlamaEngine:
        if (name, dtype) not in cache:
            cache[name, dtype] = refllama.load(FIXTURES / name, dtype=dtype)
        return cache[name, dtype]

    return get
