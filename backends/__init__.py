"""Array backends (installed as `refllama.backends`). A backend is imported only when asked for by name."""

from __future__ import annotations

import importlib

from refllama.backends.base import Backend
from refllama.dtypes import DataType
from refllama.errors import BackendError

# name -> (module, class, the extra that installs its dependencies)
REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "numpy": ("refllama.backends.numpy_backend", "NumpyBackend", None),
    "mlx": ("refllama.backends.mlx_backend", "MlxBackend", "mlx"),
    "numba": ("refllama.backends.numba_backend", "NumbaBackend", "numba"),
    "cupy": ("refllama.backends.cupy_backend", "CupyBackend", "cupy"),
}


def get_backend(name: str = "numpy", dtype: str | DataType = DataType.F32) -> Backend:
    """Instantiate a backend by name for a compute dtype; unknown names and dtypes raise BackendError."""
    try:
        module_name, class_name, extra = REGISTRY[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r} (available: {', '.join(REGISTRY)})") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = f"; install it with: pip install 'refllama[{extra}]'" if extra else ""
        raise BackendError(f"backend {name!r} cannot be imported ({e}){hint}") from None
    try:
        compute = DataType.parse(dtype)
    except ValueError:
        raise BackendError(f"unknown compute dtype {dtype!r}") from None
    return getattr(module, class_name)(compute)


__all__ = ["REGISTRY", "Backend", "get_backend"]
