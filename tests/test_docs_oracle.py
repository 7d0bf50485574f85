"""Every Python block of docs/oracle.md and docs/trace-format.md runs as written, from the repository root's
point of view (their paths are relative to it), each as its own pytest module: module-level code at collection,
test functions as tests. (~20 s)"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
DOCS = ["docs/oracle.md", "docs/trace-format.md"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_python_block_runs(doc, tmp_path):
    blocks = BLOCK.findall((ROOT / doc).read_text())
    assert blocks, f"{doc} has no python block"
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    files = [tmp_path / f"test_block_{i}.py" for i in range(len(blocks))]
    for file, block in zip(files, blocks, strict=True):
        file.write_text(block)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                        *map(str, files)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    # 5: nothing to collect, the blocks being plain code that ran (at collection) without an error
    assert r.returncode in (0, 5), r.stdout[-4000:] + r.stderr[-2000:]
