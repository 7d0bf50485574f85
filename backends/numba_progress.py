"""A visible "compiling kernels (first run only)" status while Numba compiles the numba backend's kernels.

Numba compiles a kernel the first time it is called with new argument types unless its disk cache
(numba_kernels.cache_dir()) holds that specialisation; only a real compile fires Numba's "numba:compile" event, so a
run whose kernels all load from the cache shows nothing. By default the status goes to stderr: a rich spinner with
the count and the kernel being compiled on a terminal, one plain line otherwise (logs), nothing under pytest or with
REFLLAMA_QUIET set. A front end with a status line of its own (the CLI's spinner) takes the reports instead through
`set_reporter`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from numba.core import event

Reporter = Callable[[int, str], None]  # (kernels compiled so far, the kernel being compiled now)

MESSAGE = "compiling kernels (first run only)"


class _CompileListener(event.Listener):
    """Counts compiles of this package's kernels (nested ones too: a kernel compiles the kernels it calls)."""

    def __init__(self) -> None:
        self.compiled = 0
        self.depth = 0
        self.reporter: Reporter | None = None
        self.status: Any = None  # the default reporter's rich Status while a compile runs on a terminal
        self.said = False  # the default reporter's plain line, once per process

    @staticmethod
    def _kernel(ev: event.Event) -> str | None:
        func = getattr(ev.data.get("dispatcher"), "py_func", None)
        module = getattr(func, "__module__", "") or ""
        return func.__name__ if module.startswith(("refllama.backends.", "backends.")) else None

    def on_start(self, ev: event.Event) -> None:
        name = self._kernel(ev)
        if name is None:
            return
        self.depth += 1
        (self.reporter or self._default)(self.compiled, name)

    def on_end(self, ev: event.Event) -> None:
        if self._kernel(ev) is None:
            return
        self.compiled += 1
        self.depth -= 1
        if self.depth == 0 and self.status is not None:  # the outermost kernel is done: leave the terminal clean
            self.status.stop()
            self.status = None

    def _default(self, compiled: int, name: str) -> None:
        if os.environ.get("PYTEST_CURRENT_TEST") or os.environ.get("REFLLAMA_QUIET"):
            return
        text = f"{MESSAGE}: {compiled} done, now {name}"
        if not sys.stderr.isatty():
            if not self.said:
                print(f"refllama: {MESSAGE}; later runs load them from the cache", file=sys.stderr, flush=True)
                self.said = True
            return
        if self.status is not None:
            self.status.update(text)
            return
        from rich.console import Console
        from rich.errors import LiveError

        status = Console(stderr=True).status(text)
        try:
            status.start()
        except LiveError:  # another rich display owns the terminal: it did not ask for reports, so stay quiet
            return
        self.status = status


_LISTENER = _CompileListener()
event.register("numba:compile", _LISTENER)


def set_reporter(reporter: Reporter | None) -> Reporter | None:
    """Send compile reports to `reporter` (None: the default stderr status); returns the previous one."""
    previous, _LISTENER.reporter = _LISTENER.reporter, reporter
    return previous


def compiled_count() -> int:
    """Kernels this process has compiled (0 when every one came from the cache)."""
    return _LISTENER.compiled
