"""Start-up stays fast: `import refllama` and `refllama --help` import none of the slow libraries.

Checked by what a fresh interpreter has imported, not by timing it (timings depend on the machine's load).
ml_dtypes alone takes longer to import than everything `refllama --help` needs. About 4 s in all.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import refllama

from conftest import FIXTURES

# Libraries `import refllama` and `refllama --help` must not import (numpy too, for --help).
SLOW = {"ml_dtypes", "jinja2", "tokenizers", "sentencepiece", "rich", "tqdm", "safetensors", "numba", "mlx", "cupy",
        "matplotlib", "torch", "transformers"}


def imported_after(code: str) -> set[str]:
    """The top-level modules a fresh interpreter holds after running `code`, plus refllama's own submodules."""
    script = (f"import contextlib, io, json, sys\nwith contextlib.redirect_stdout(io.StringIO()):\n"
              f"    try:\n        {code}\n    except SystemExit:\n        pass\n"
              f"print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    return {m if m.startswith("refllama") else m.split(".")[0] for m in json.loads(out.stdout)}


def test_import_refllama_imports_nothing_slow():
    modules = imported_after("import refllama")
    assert modules & SLOW == set()
    assert "numpy" not in modules
    assert {m for m in modules if m.startswith("refllama")} == {"refllama"}


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["inspect", "--help"]])
def test_cli_help_imports_nothing_slow(argv):
    modules = imported_after(f"from refllama.cli import main; main({argv!r})")
    assert modules & SLOW == set()
    assert "numpy" not in modules
    assert {m for m in modules if m.startswith("refllama")} == {"refllama", "refllama.cli", "refllama.errors"}


def test_light_public_names_do_not_import_ml_dtypes_or_jinja2():
    modules = imported_after("from refllama import DataType, GenerationRequest, KVCache, LlamaConfig, RefLlamaError")
    assert modules & SLOW == set()


def test_engine_import_leaves_ml_dtypes_and_jinja2_until_used():
    """Loading pulls the tokenizer libraries; bfloat16 (ml_dtypes) and chat templates (jinja2) wait for a model
    or request that needs them."""
    modules = imported_after("from refllama import load")
    assert modules & {"ml_dtypes", "jinja2", "rich", "tqdm", "safetensors", "numba", "mlx", "cupy"} == set()


@pytest.mark.parametrize(("fixture", "needs_ml_dtypes"), [("gelu", False), ("llama32", True)])
def test_ml_dtypes_is_imported_by_the_first_bfloat16_tensor(fixture, needs_ml_dtypes):
    """A float32 checkpoint loads and runs on the numpy backend without ml_dtypes; a bfloat16 one imports it."""
    path = FIXTURES / fixture
    modules = imported_after(f"import refllama; refllama.load({str(path)!r}).logits([1, 2, 3])")
    assert ("ml_dtypes" in modules) is needs_ml_dtypes


def test_is_ml_float():
    import ml_dtypes
    import numpy as np

    from refllama.dtypes import is_ml_float

    floats = [ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]
    assert all(is_ml_float(np.dtype(t)) for t in floats)
    assert not any(is_ml_float(np.dtype(t)) for t in (np.float32, np.float16, np.int8, np.uint8, ml_dtypes.int4))


def test_public_names_resolve_to_their_modules():
    for name in refllama.__all__:
        value = getattr(refllama, name)
        assert value is getattr(sys.modules[refllama._EXPORTS[name]], name)
    assert set(refllama.__all__) == set(refllama._EXPORTS)
    assert set(refllama.__all__) <= set(dir(refllama))
    from refllama import GenericLlamaEngine, RefLlamaError, load  # `from refllama import ...` as before

    assert GenericLlamaEngine.__module__ == "refllama.engine" and load.__module__ == "refllama.engine"
    assert issubclass(refllama.InputError, RefLlamaError)


def test_unknown_names_raise_as_a_module_does():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        refllama.nope  # noqa: B018
    with pytest.raises(ImportError):
        from refllama import nope  # noqa: F401
