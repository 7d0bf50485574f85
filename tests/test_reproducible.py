"""The committed fixtures and golden numbers are what the tools/ scripts make (so the goldens are HF's own)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import GOLDEN, ROOT

sys.path.insert(0, str(ROOT / "tools"))


def test_fixtures_regenerate_byte_for_byte():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "make_fixtures.py"), "--check"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _have_golden_extra() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


@pytest.mark.skipif(not _have_golden_extra() and not os.environ.get("CI"),
                    reason="needs the [golden] extra (torch, transformers); .ci/run installs it and runs this")
@pytest.mark.parametrize("name", ["llama32", "dynamic"])
def test_golden_regenerates_with_transformers(name):
    """Rerun transformers on a fixture and compare with the committed golden file (CI always runs this)."""
    import make_golden

    fresh = make_golden.golden_for_fixture(name)
    with np.load(GOLDEN / f"{name}.npz") as committed:
        assert sorted(committed.files) == sorted(fresh)
        for key, value in fresh.items():
            if value.dtype.kind in "iu":
                np.testing.assert_array_equal(value, committed[key], err_msg=key)
            else:
                tol = make_golden.CHECK_ATOL["f64" if value.dtype == np.float64 else "f32"]
                np.testing.assert_allclose(value, committed[key], rtol=0, atol=tol, err_msg=key)
