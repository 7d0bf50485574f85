"""The backend conformance suite (refllama/testing/conformance.py) on every backend installed here, in every
compute dtype it declares: operations against the reference arithmetic, models against the golden files. Then,
in throwaway pytest sessions, the suite as another project's test module gets it."""

from __future__ import annotations

from refllama.testing import plugin
from refllama.testing.conformance import *  # noqa: F403
from refllama.testing.conformance import NO_GOLDEN

from test_plugin import run

pytest_plugins = ["pytester"]

OUTSIDE = "from refllama.testing.conformance import *  # noqa: F403\n"


def test_an_outside_module_gets_the_suite_for_the_backends_it_names(pytester):
    pytester.makepyfile(test_mine=OUTSIDE)
    result = run(pytester, "-v", "--refllama-backends=numpy", "--refllama-dtypes=float64", "-k", "rms_norm")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*test_rms_norm[[]numpy-float64-shape0[]] PASSED*"])


def test_without_golden_files_the_golden_part_skips_saying_why(pytester, monkeypatch):
    monkeypatch.setattr(plugin, "checkout_golden_dir", lambda: None)  # refllama installed from a wheel
    pytester.makepyfile(test_mine=OUTSIDE)
    result = run(pytester, "-rs", "--refllama-backends=numpy", "--refllama-dtypes=float32", "-k",
                 "test_fixture_logits or padded_batch or embedding_is")
    result.assert_outcomes(passed=3, skipped=2)  # the ops run; a parametrized and a plain golden test skip
    result.stdout.fnmatch_lines([f"SKIPPED *{NO_GOLDEN}", f"SKIPPED *{NO_GOLDEN}"])
