"""A first run's attention kernels compiled by a second process while this one compiles the rest.

On a cold kernel cache the first forward passes compile every kernel they call, one after another, on one core.
The two attention kernels are the slowest to compile (prompt_attention ~5 s, attention ~2 s on the machine of
docs/numba.md) and every model calls them. When the numba backend starts and finds them missing from the cache, it
starts `python -m refllama.backends.numba_helper`, which compiles them into the same cache with the argument types
the backend passes (`_kernels`: the warm-up calls of numba_kernels and numba_gemm) while this process compiles the
embedding, norm and matmul kernels a prompt needs first. Before the backend first calls one of them, it waits for
the helper's word that it is cached and then loads it; one the helper has not started yet (a short prompt calls the
decode kernel first) it compiles itself rather than wait behind the other. Numba compiles under one process-wide
lock, so a thread could not do this. The compiled code is the same either way; only the wall time changes.
REFLLAMA_COMPILE_HELPER=0 turns the helper off, and on a single usable CPU none starts. A helper still running when
this process exits is stopped.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
from collections.abc import Callable

WAIT_S = 120.0  # the longest wait for a kernel (then this process compiles it itself)


def _kernels() -> dict[str, tuple[object, Callable[[], None]]]:
    """name -> (dispatcher, the warm-up call that compiles it for the backend's argument types)."""
    from refllama.backends import numba_gemm, numba_kernels

    return {"prompt_attention": (numba_gemm.prompt_attention, numba_gemm.warm_prompt_attention),
            "attention": (numba_kernels.attention, numba_kernels.warm_attention)}


def _cached(dispatcher: object) -> bool:
    """Whether Numba's disk cache holds an entry of this kernel for its current source (any types); True when
    that cannot be read (then no helper starts)."""
    try:
        return bool(dispatcher._cache._cache_file._load_index())  # {} when missing or stale
    except Exception:
        return True


class Helper:
    """The helper process and what it has said: the kernel it is compiling now, and those it has cached."""

    def __init__(self, names: list[str]):
        self.process = subprocess.Popen([sys.executable, "-m", __name__, *names], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.names = set(names)
        self.started: set[str] = set()
        self.ready = {name: threading.Event() for name in names}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        atexit.register(self.stop)

    def _read(self) -> None:
        for line in self.process.stdout:  # "start NAME", then "done NAME" once it is in the cache
            said, _, name = line.strip().partition(" ")
            if said == "start":
                self.started.add(name)
            elif said == "done" and name in self.ready:
                self.ready[name].set()
        for event in self.ready.values():  # the helper has ended: what it did not compile, this process will
            event.set()

    def wait(self, name: str) -> bool:
        """Before this process first calls kernel `name`: wait for it if the helper is compiling it now (or has);
        a kernel the helper has not started yet this process compiles itself rather than wait behind another.
        True once the helper has nothing more for this process (every kernel done, or it ended)."""
        event = self.ready.get(name)
        if event is not None and name in self.started:
            event.wait(WAIT_S)
        self.names.discard(name)  # asked once: the next call finds it in memory, whoever compiled it
        return all(self.ready[other].is_set() for other in self.names)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait()
        self._reader.join(5.0)  # it reads to the end of the pipe, which the helper's exit closed
        if not self._reader.is_alive():
            self.process.stdout.close()


_STARTED: list[Helper] = []  # this process's helper: one at most


def start(cpus: int) -> Helper | None:
    """The helper for the kernels the cache lacks, started by the first call in this process; None when they are
    all cached, on fewer than two usable CPUs (`cpus`: the two processes would take turns), or with
    REFLLAMA_COMPILE_HELPER=0."""
    if _STARTED:
        return _STARTED[0]
    if os.environ.get("REFLLAMA_COMPILE_HELPER", "1") == "0" or cpus < 2:
        return None
    missing = [name for name, (dispatcher, _) in _kernels().items() if not _cached(dispatcher)]
    if not missing:
        return None
    _STARTED.append(Helper(missing))
    return _STARTED[0]


def main(names: list[str]) -> None:
    """In the helper process: compile each named kernel into the cache, saying its name once done."""
    kernels = _kernels()
    for name in names:
        print("start", name, flush=True)
        kernels[name][1]()
        print("done", name, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
