"""The hostile-input corpus: every case raises the refllama error its manifest names (naming the culprit), or
succeeds where it must; none hangs, runs out of memory or crashes.

Cases are written by make_corpus.py into a temporary folder and run by two worker processes (run_cases.py), each
under a 2 GiB address-space limit with a 10 s alarm per case; a worker silent for 20 s is killed and the case
counted as a hang. About 40 s on two busy cores.
"""

from __future__ import annotations

import json
import queue
import select
import subprocess
import sys
import threading
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_corpus import build  # noqa: E402

WORKERS = 2
SILENCE_S = 20  # a worker that has not answered by then is stuck in C code


def _worker() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "run_cases.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)


def run_corpus(cases: list[dict]) -> list[dict]:
    todo: queue.Queue = queue.Queue()
    for case in cases:
        todo.put(case)
    results: list[dict] = []
    lock = threading.Lock()

    def drive() -> None:
        proc = _worker()
        try:
            while True:
                try:
                    case = todo.get_nowait()
                except queue.Empty:
                    return
                proc.stdin.write(json.dumps(case) + "\n")
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], SILENCE_S)
                line = proc.stdout.readline() if ready else ""
                if line:
                    result = json.loads(line)
                else:  # silent or dead: a hang, or a crash of the interpreter (e.g. a signal)
                    code = proc.poll()
                    proc.kill()
                    proc.wait()
                    result = {"name": case["name"], "ok": False,
                              "outcome": f"worker died (exit {code})" if code is not None else "hang"}
                    proc = _worker()
                with lock:
                    results.append(result)
        finally:
            proc.kill()
            proc.wait()

    threads = [threading.Thread(target=drive) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build(tmp_path_factory.mktemp("corpus"))


def test_corpus_is_large_and_distinct(corpus):
    assert len(corpus) >= 150
    assert len({c["name"] for c in corpus}) == len(corpus)
    assert all(c["expect"] == "ok" or c["words"] for c in corpus)  # every error names what is wrong


def test_every_case_is_refused_with_a_typed_error_naming_the_culprit(corpus):
    results = run_corpus(corpus)
    assert len(results) == len(corpus)
    failed = [f"{r['name']}: {r['outcome']}" for r in results if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(corpus)} cases failed:\n" + "\n".join(failed)
