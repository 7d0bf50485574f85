"""Array backends (installed as `refllama.backends`), found by name and imported only when asked for.

A backend named NAME lives in `backends/NAME_backend.py`, which sets `BACKEND` to its `Backend` subclass
(backends/base.py). Adding one is adding that file (and its pip extra): nothing here or elsewhere lists it.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from refllama.backends.base import Backend
from refllama.dtypes import DataType
from refllama.errors import BackendError

SUFFIX = "_backend"
# Registry order: the reference first, then the rest alphabetically.
_FIRST = "numpy"


def names() -> list[str]:
    """Every backend in this package, installed or not (the reference, numpy, first)."""
    here = [str(Path(__file__).parent)]
    found = sorted(m.name[:-len(SUFFIX)] for m in pkgutil.iter_modules(here) if m.name.endswith(SUFFIX))
    return sorted(found, key=lambda n: n != _FIRST)


def backend_class(name: str) -> type[Backend]:
    """The Backend subclass called `name`, importing its module (once: Python keeps it); BackendError when unknown
    or not installed."""
    if name not in names():
        raise BackendError(f"unknown backend {name!r} (available: {', '.join(names())})")
    try:
        module = importlib.import_module(f"{__name__}.{name}{SUFFIX}")
    except ImportError as e:
        raise BackendError(f"backend {name!r} cannot be imported ({e}); install it from the refllama checkout "
                           f"with: pip install -e \".[{name}]\"") from None
    return module.BACKEND


def installed() -> list[type[Backend]]:
    """The backend classes that import here, in registry order."""
    out = []
    for name in names():
        try:
            out.append(backend_class(name))
        except BackendError:
            continue
    return out


def get_backend(name: str = "numpy", dtype: str | DataType = DataType.F32) -> Backend:
    """Instantiate a backend by name for a compute dtype; unknown names and dtypes raise BackendError."""
    try:
        compute = DataType.parse(dtype)
    except ValueError:
        raise BackendError(f"unknown compute dtype {dtype!r}") from None
    return backend_class(name)(compute)


__all__ = ["Backend", "backend_class", "get_backend", "installed", "names"]
