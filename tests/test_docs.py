"""The documentation runs as written: every ```python block of README.md and docs/ is executed (a file's blocks in
order, in one namespace), every ```console block's commands are run and must print what the block shows, the
files the docs name exist, and the documentation site builds with `mkdocs build --strict`.

Placeholders become the embedded model (SmolLM2) or a fixture; `FRAGMENT_NAMES` lists the few names a fragment
uses without defining them. Blocks of other kinds are not run: `text` (a schema), `shell` (install commands, which
.ci/run runs) and indented blocks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from conftest import FIXTURES, ROOT, smollm2_engine, smollm2_path

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER_MODELS = ("path/to/hf-llama-folder-or-model.gguf", "path/to/model", '"model.gguf"')
SLOW = {  # block text -> what CI runs instead: docs/mlx.md's timing script on 8 prompt tokens and 4 steps
    'np.load("golden/smollm2.npz")["paragraph_ids"]': 'np.load("golden/smollm2.npz")["paragraph_ids"][:8]',
    "STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 512": "STEPS = 4",
    "len(PROMPT) + 64, 64))": "len(PROMPT) + 4, 4))",
}
BOX = re.compile("[│┃┏┓┗┛━─┡┩└┘┌┐╇╈┳┻┼╋╭╮╰╯]")


def blocks(path: Path, kind: str) -> list[tuple[int, str]]:
    """(line, text) of the fenced blocks whose info string is `kind`."""
    return [(t.map[0] + 1, t.content) for t in MarkdownIt().parse(path.read_text(encoding="utf-8"))
            if t.type == "fence" and t.info.strip() == kind]


def _ids(kind: str) -> list:
    return [pytest.param(p, id=p.relative_to(ROOT).as_posix()) for p in DOCS if blocks(p, kind)]


def _model_text(text: str) -> str:
    model = str(smollm2_path())
    for placeholder in PLACEHOLDER_MODELS:
        quote = '"' if placeholder.startswith('"') else ""
        text = text.replace(placeholder, f"{quote}{model}{quote}")
    for slow, fast in SLOW.items():
        text = text.replace(slow, fast)
    return text


def fragment_names() -> dict:
    """What the docs' fragments use without defining it: reference and candidate logits, and an engine under test."""
    import pytest as pytest_module

    import refllama

    reference = refllama.load(FIXTURES / "llama32", dtype="float64").logits([1, 5, 9, 3, 7, 2])
    candidate = refllama.load(FIXTURES / "llama32", dtype="float32").logits([1, 5, 9, 3, 7, 2])

    def my_engine_logits(path, ids):
        return refllama.load(path, dtype="float32").logits(ids)

    return {"pytest": pytest_module, "reference": reference, "candidate": candidate,
            "my_engine_logits": my_engine_logits}


@pytest.fixture
def shared_smollm2(monkeypatch):
    """refllama.load of the embedded model on the numpy backend returns the session's copy (a load is ~3 s of CPU);
    any other load is a real one."""
    import refllama

    real = refllama.load

    def load(path=None, backend="numpy", dtype="float32", progress=None, **options):
        if (path is None or Path(path) == smollm2_path()) and backend == "numpy" and not options and not progress:
            return smollm2_engine(str(dtype))
        return real(path, backend=backend, dtype=dtype, progress=progress, **options)

    monkeypatch.setattr(refllama, "load", load)


@pytest.mark.parametrize("path", _ids("python"))
def test_python_blocks_run(path, monkeypatch, capsys, shared_smollm2):
    """A file's python blocks run in order in one namespace; an ```output block after one must be what it printed."""
    import refllama

    monkeypatch.chdir(ROOT)  # the docs' scripts run from the repository root
    namespace = {"__name__": "docs", "refllama": refllama, **fragment_names()}
    printed = ""
    for token in MarkdownIt().parse(path.read_text(encoding="utf-8")):
        if token.type != "fence":
            continue
        where = f"{path.name}:{token.map[0] + 1}"
        if token.info.strip() == "python":
            capsys.readouterr()
            try:
                exec(compile(_model_text(token.content), where, "exec"), namespace)
            except refllama.BackendError as e:
                if "cannot be imported" not in str(e):
                    raise
                pytest.skip(f"{where} needs a backend that is not installed here: {e}")
            printed = capsys.readouterr().out
        elif token.info.strip() == "output":
            assert printed == token.content, f"{where}: the block above now prints\n{printed}"
    for name, test in list(namespace.items()):  # tests the docs define, runnable as they stand (hypothesis)
        defined_here = getattr(getattr(test, "__code__", None), "co_filename", "").startswith(path.name)
        if name.startswith("test_") and defined_here and not getattr(test, "pytestmark", None):
            test()  # (imported tests, such as the conformance suite's, are pytest's to run)


def _commands(text: str) -> list[tuple[str, list[str]]]:
    """A console block as (command, the output lines shown after it)."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
    return out


def _normalise(text: str) -> str:
    return re.sub(r"[ \t]+", " ", BOX.sub(" ", text))


def _expected(line: str) -> re.Pattern:
    """A shown output line as a pattern: `...` stands for anything left out, speeds are whatever they are now."""
    parts = [re.escape(_normalise(p).strip()) for p in line.split("...")]
    pattern = r".*?".join(parts)
    return re.compile(re.sub(r"[0-9]+\\\.[0-9]+(\\ tok/s)", r"[0-9.]+\1", pattern), re.S)


@pytest.mark.parametrize("path", _ids("console"))
def test_console_blocks_print_what_they_show(path, tmp_path):
    """Each `$ command` runs in a shell (in a scratch folder that sees the repository's tests/ and golden/); the
    lines shown after it must appear in its output, in order."""
    for name in ("tests", "golden"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    sparse = None
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("COLUMNS", None)
    for command, shown in _commands(blocks_text := "\n".join(t for _, t in blocks(path, "console"))):
        if "path/to/Llama-3.1-70B-Instruct" in command:  # the 70B example: a sparse folder of its shape
            if sparse is None:
                sys.path.insert(0, str(ROOT / "tools"))
                import make_sparse_checkpoint

                sparse = make_sparse_checkpoint.write(tmp_path / "Llama-3.1-70B-Instruct")
            command = command.replace("path/to/Llama-3.1-70B-Instruct", str(sparse))
        if "--backend-b mlx" in command:
            pytest.importorskip("mlx.core")
        if "--engine mlx-lm" in command:
            pytest.importorskip("mlx_lm")
        command = command.replace("SmolLM2-135M-Instruct.Q4_1.gguf", str(smollm2_path()))  # the embedded model
        r = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        output = _normalise(r.stdout + r.stderr)
        position = 0
        for line in (line for line in shown if line.strip()):
            match = _expected(line).search(output, position)
            assert match, f"{path.name}: `{command}` did not print {line!r}; it printed:\n{r.stdout}{r.stderr}"
            position = match.end()
    assert blocks_text


REPO_PATH = re.compile(r"`((?:refllama|backends|tools|tests|docs|golden|examples|\.ci)/[\w./*-]*"
                       r"|README\.md|pyproject\.toml|mkdocs\.yml)`")


@pytest.mark.parametrize("path", [pytest.param(p, id=p.relative_to(ROOT).as_posix()) for p in DOCS])
def test_docs_name_only_files_in_the_repository(path):
    text = path.read_text(encoding="utf-8")
    missing = []
    for name in REPO_PATH.findall(text):
        if "*" in name:
            found = list(ROOT.glob(name))
        else:
            found = [p for p in (ROOT / name, path.parent / name) if p.exists()]
        if not found:
            missing.append(name)
    assert not missing, f"{path.name} names files that are not in the repository: {missing}"
    assert "shared/" not in text, f"{path.name} cites shared/, which is not part of the repository"
    assert not re.search(r"\bissue \d+", text, re.I), f"{path.name} cites an issue number without context"


def test_docs_site_builds_strictly(tmp_path):
    """mkdocs-material (the [dev] extra): broken links, missing pages or bad markup fail the build."""
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None:
        if os.environ.get("CI"):
            raise AssertionError("mkdocs must be installed in CI (the [dev] extra)")
        pytest.skip("mkdocs not installed: pip install -e '.[dev]'")
    r = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "-q", "-f",
                        str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "walkthrough" / "index.html").is_file()


def test_walkthrough_figures_are_made_by_the_script(tmp_path, shared_smollm2):
    """docs/img's pictures come from tools/walkthrough_figures.py, which must still make them."""
    pytest.importorskip("matplotlib")
    smollm2_path()
    sys.path.insert(0, str(ROOT / "tools"))
    import walkthrough_figures

    assert walkthrough_figures.main([str(tmp_path)]) == 0
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == ["attention.png", "next_token.png", "rope.png"]
    assert all((ROOT / "docs" / "img" / name).is_file() for name in made)
    assert all(f"img/{name}" in (ROOT / "docs" / "walkthrough.md").read_text() for name in made)
