"""Run corpus cases (tests/hostile/make_corpus.py) in a worker process with a 2 GiB address-space limit.

    python tests/hostile/run_cases.py      # reads one case (JSON) per line on stdin, writes one result per line

Each case runs under a 10 s alarm; a result says whether the case did what its manifest entry demands: the named
refllama error with the named words in its message (and none of the forbidden ones), or success. Anything else (an
untyped exception, MemoryError, a timeout, a wrong success) is a failure, reported with its type and message. The
parent (tests/hostile/test_corpus.py) kills and replaces a worker that stops answering (a hang in C code).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

import refllama.backends.numpy_backend  # noqa: F401
from refllama import errors
from refllama.diagnostics import memory

ADDRESS_SPACE = 2 << 30
TIMEOUT_S = 10
ERRORS = {**{n: getattr(errors, n) for n in dir(errors) if isinstance(getattr(errors, n), type)},
          "AllocationError": memory.AllocationError, "MemoryLimitError": memory.MemoryLimitError}


class Timeout(BaseException):
    pass


def _alarm(*_: Any) -> None:
    raise Timeout


def act(case: dict) -> Any:
    """Make the call the case names."""
    from refllama.diagnostics.diagnostic import ModelDiagnostic
    from refllama.engine import load
    from refllama.formats.gguf import GGUFFile
    from refllama.formats.tokenizer import load_tokenizer
    from refllama.generation import GenerationRequest
    from refllama.generation.chat import render_chat_template
    from refllama.loading import read_model

    a, path = case["args"], case["path"]
    kind = case["action"]
    if kind == "load":
        return load(path, **a)
    if kind == "load_path":
        return load(a["path"])
    if kind == "gguf":
        return GGUFFile(path)
    if kind == "blocks":  # as a backend that reads Q8_0 blocks in place
        return read_model(path, SimpleNamespace(reads_as_stored=frozenset({"Q8_0"})))
    if kind == "tokenizer":
        return load_tokenizer(path)
    if kind == "inspect":
        return ModelDiagnostic.analyze_directory(path, **a)
    if kind == "chat":
        return render_chat_template(a["template"], [{"role": "user", "content": "hi"}])
    if kind == "request":
        return GenerationRequest(**a)
    if kind == "parse_bytes":
        return memory.parse_bytes(a["value"])
    if kind == "backend_config":
        return memory.BackendConfig(**a)
    if kind == "generate_ids":
        return load(path).generate_ids(a["ids"], a["max_new_tokens"], **({"stop_at_eos": a["stop_at_eos"]}
                                                                          if "stop_at_eos" in a else {}))
    if kind == "generate_ids_unverified":
        return load(path, verify=False).generate_ids(a["ids"], a["max_new_tokens"])
    if kind == "logits":
        return load(path).logits(a["ids"])
    if kind == "logits_unverified":
        return load(path, verify=False).logits(a["ids"])
    if kind == "generate":
        return load(path).generate(GenerationRequest(**a))
    if kind == "new_cache":
        engine = load(path)
        if "memory_limit" in a:
            engine.memory_manager = memory.MemoryManager(memory.parse_bytes(a["memory_limit"]))
        return engine.new_cache(1, a["max_len"])
    raise ValueError(f"unknown action {kind}")


def judge(case: dict) -> dict:
    """{"name", "ok", "outcome"}: outcome is "ok", "ErrorType: message", "timeout" or "crash ..."."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    try:
        result = act(case)
        outcome, error = "ok", None
    except Timeout:
        return {"name": case["name"], "ok": False, "outcome": f"timeout after {TIMEOUT_S} s"}
    except BaseException as e:  # judged below: only the named refllama error passes
        outcome, error = f"{type(e).__name__}: {str(e)[:500]}", e
    finally:
        signal.alarm(0)
    expect = case["expect"]
    if expect == "ok":
        good = error is None and (case["check"] is None or bool(eval(case["check"], {"np": np}, {"result": result})))
    else:
        text = str(error).lower() if error is not None else ""
        good = (error is not None and isinstance(error, ERRORS[expect])
                and all(w.lower() in text for w in case["words"])
                and not any(w.lower() in text for w in case["forbid"]))
    return {"name": case["name"], "ok": good, "outcome": outcome}


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    for line in sys.stdin:
        print(json.dumps(judge(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
