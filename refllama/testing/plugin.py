"""pytest plugin (entry point `pytest11`): refllama as a test oracle in any project's suite.

Fixtures:
* `refllama_engine`: parametrises a test over every (backend, dtype) refllama can run here (numpy float32 and
  float64, mlx float32 when mlx imports, any other registered backend that imports); calling it with a model path
  gives the engine, loaded once per session. `.profile` names the tolerance profile that fits its dtype.
* `refllama_reference`: the oracle itself, numpy float64, loaded once per session.
* `refllama_golden`: the golden .npz files (transformers' outputs) from `--refllama-golden-dir`, the ini option
  `refllama_golden_dir`, or a refllama checkout's golden/ folder.

Markers `refllama_gpu` and `refllama_mlx` skip a test, with the reason, where no CUDA device answers or mlx does
not import. Detection is lazy (nothing is imported or initialised until a test asks), because an installed plugin
loads in every pytest run of the environment.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from refllama.backends import backend_class, installed, names
from refllama.dtypes import DataType
from refllama.errors import BackendError, CheckpointError
from refllama.testing.comparison import Report, assert_logits_close
from refllama.testing.golden import checkout_golden_dir, golden_fixture_names

DEFAULT_DTYPES = ("float32", "float64")
# The tolerance profile (refllama.testing.PROFILES) for a candidate computing in this dtype against the float64
# reference; float16 has no calibration of its own and is held to bfloat16's.
PROFILE_FOR_DTYPE = {"float64": "f64", "float32": "f32", "bfloat16": "bf16", "float16": "bf16"}
MARKERS = {
    "refllama_gpu": "needs a CUDA device; skipped with the reason 'no CUDA device' where none answers",
    "refllama_mlx": "needs MLX; skipped with the reason 'mlx not installed' where mlx.core does not import",
}


@dataclass(frozen=True)
class EngineSpec:
    """One (backend, compute dtype) pair; `id` is the test id suffix, e.g. "numpy-float64"."""

    backend: str
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.dtype}"

    @property
    def profile(self) -> str:
        return PROFILE_FOR_DTYPE[self.dtype]


def available_engines(backends: Sequence[str] | None = None,
                      dtypes: Sequence[str] | None = DEFAULT_DTYPES) -> list[EngineSpec]:
    """The (backend, dtype) pairs of the backends (`refllama.backends.names()`) that import here and run the
    dtype, in registry order (backends None: every backend; dtypes None: every dtype each backend declares)."""
    specs = []
    for cls in installed():
        if backends is not None and cls.name not in backends:
            continue
        wanted = cls.dtypes if dtypes is None else [DataType.parse(d) for d in dtypes]
        specs += [EngineSpec(cls.name, d.value) for d in wanted if d in cls.dtypes]
    return specs


def selected_engines(config: pytest.Config, dtypes: Sequence[str] | None = DEFAULT_DTYPES) -> list[EngineSpec]:
    """available_engines narrowed by --refllama-backends and --refllama-dtypes (or their ini options); `dtypes`
    where neither names any."""
    return available_engines(_listed(config, "refllama_backends"), _listed(config, "refllama_dtypes") or dtypes)


def backend_marks(name: str) -> list[pytest.MarkDecorator]:
    """The marker a backend declares (Backend.marker), as pytest marks for its test parameters."""
    marker = backend_class(name).marker
    return [getattr(pytest.mark, marker)] if marker else []


def cuda_device_count() -> int:
    """CUDA devices the driver reports (0 without a driver), asked through the driver API itself so that no CUDA
    Python package is needed. It initialises the driver in this process: call it only for tests that want a GPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0
    libraries = {"win32": ["nvcuda.dll"], "darwin": []}.get(sys.platform, ["libcuda.so.1", "libcuda.so"])
    for library in libraries:
        try:
            cuda = ctypes.CDLL(library)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def mlx_available() -> bool:
    try:
        importlib.import_module("mlx.core")
    except ImportError:
        return False
    return True


class EngineFactory:
    """What `refllama_engine` gives a test: call it with a model (HF folder or .gguf; None: the embedded
    SmolLM2, skipping the test when it is not installed) for the engine on this backend and dtype."""

    def __init__(self, spec: EngineSpec, cache: EngineCache):
        self.spec, self._cache = spec, cache

    @property
    def backend(self) -> str:
        return self.spec.backend

    @property
    def dtype(self) -> str:
        return self.spec.dtype

    @property
    def profile(self) -> str:
        return self.spec.profile

    def __call__(self, path: str | Path | None = None) -> Any:
        return self._cache.load(path, self.backend, self.dtype)

    def assert_close(self, reference: np.ndarray, candidate: np.ndarray, profile: str | None = None) -> Report:
        """refllama.testing.assert_logits_close with this engine's profile (or `profile`)."""
        __tracebackhide__ = True
        return assert_logits_close(reference, candidate, profile or self.profile)

    def __repr__(self) -> str:
        return f"<refllama_engine {self.spec.id}>"


@dataclass
class EngineCache:
    """Engines loaded in this session by (model, backend, dtype): loading SmolLM2 takes seconds, tests take
    milliseconds."""

    engines: dict[tuple[str, str, str], Any] = field(default_factory=dict)

    def load(self, path: str | Path | None, backend: str, dtype: str) -> Any:
        import refllama
        from refllama.formats.default_model import default_model_path

        if path is None:
            try:
                path = default_model_path()
            except CheckpointError as e:
                pytest.skip(f"the default model is not installed ({e})")
        key = (str(Path(path).resolve()), backend, dtype)
        if key not in self.engines:
            self.engines[key] = refllama.load(path, backend=backend, dtype=dtype)
        return self.engines[key]


class GoldenFiles:
    """A directory of golden .npz files: `golden("bias")` is that file's arrays (read-only, loaded once);
    `checkpoint("bias")` the model they were made from, as golden/manifest.json records it. In a refllama checkout
    the tiny quantized checkpoints sit beside it too (tests/fixtures/quant/NAME, each with its golden.npz)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self._loaded: dict[Path, dict[str, np.ndarray]] = {}

    @cached_property
    def manifest(self) -> dict[str, Any]:
        path = self.dir / "manifest.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    @property
    def names(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.npz"))

    @property
    def fixtures(self) -> list[str]:
        """The golden files whose checkpoint the manifest records (`checkpoint(name)`)."""
        return golden_fixture_names(self.dir)

    @cached_property
    def quant_fixtures(self) -> list[str]:
        """The quantized checkpoints golden/quant_manifest.json lists (`quant_checkpoint`, `quant_golden`)."""
        path = self.dir / "quant_manifest.json"
        if not path.is_file():
            return []
        return sorted(json.loads(path.read_text(encoding="utf-8")).get("tiny_fixtures", {}).get("folders", []))

    def __call__(self, name: str) -> dict[str, np.ndarray]:
        path = self.dir / f"{name}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"no golden file {path} (available: {', '.join(self.names) or 'none'})")
        return self._load(path)

    def checkpoint(self, name: str) -> Path:
        try:
            relative = self.manifest["fixtures"][name]["fixture"]
        except KeyError:
            raise LookupError(f"{self.dir / 'manifest.json'} records no fixture checkpoint for {name!r}") from None
        return self.dir.parent / relative

    def quant_checkpoint(self, name: str) -> Path:
        return self.dir.parent / "tests" / "fixtures" / "quant" / name

    def quant_golden(self, name: str) -> dict[str, np.ndarray]:
        return self._load(self.quant_checkpoint(name) / "golden.npz")

    def _load(self, path: Path) -> dict[str, np.ndarray]:
        if path not in self._loaded:
            with np.load(path) as data:
                arrays = {k: data[k] for k in data.files}
            for a in arrays.values():
                a.setflags(write=False)  # shared by every test of the session
            self._loaded[path] = arrays
        return self._loaded[path]

    def __repr__(self) -> str:
        return f"<refllama_golden {self.dir}>"


def golden_dir(config: pytest.Config) -> Path | None:
    """--refllama-golden-dir (relative to where pytest was started), else the ini option (relative to the ini
    file), else a refllama checkout's golden/ folder; None when there is none of these."""
    option = config.getoption("refllama_golden_dir")
    if option:
        return (config.invocation_params.dir / option).resolve()
    ini = config.getini("refllama_golden_dir")
    if ini:
        base = config.inipath.parent if config.inipath else config.rootpath
        return (base / ini).resolve()
    return checkout_golden_dir()


def _listed(config: pytest.Config, name: str) -> list[str] | None:
    """A comma-separated command-line list, else the ini option's (whitespace-separated) list, else None."""
    option = config.getoption(name)
    if option:
        return [v.strip() for v in option.split(",") if v.strip()]
    return config.getini(name) or None


def _check_engine_options(config: pytest.Config) -> None:
    """Unknown backend or dtype names are usage errors, before collection (checking imports nothing)."""
    unknown = sorted(set(_listed(config, "refllama_backends") or ()) - set(names()))
    if unknown:
        raise pytest.UsageError(f"refllama_backends: unknown backend {', '.join(unknown)} (registered: "
                                f"{', '.join(names())})")
    for d in _listed(config, "refllama_dtypes") or ():
        try:
            DataType.parse(d)
        except ValueError:
            raise pytest.UsageError(f"refllama_dtypes: unknown dtype {d!r}") from None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("refllama", "refllama oracle")
    group.addoption("--refllama-golden-dir", dest="refllama_golden_dir", default=None,
                    help="directory of golden .npz files for the refllama_golden fixture (default: a refllama "
                         "checkout's golden/)")
    group.addoption("--refllama-backends", dest="refllama_backends", default=None,
                    help="comma-separated backends refllama_engine runs on (default: every installed one)")
    group.addoption("--refllama-dtypes", dest="refllama_dtypes", default=None,
                    help="comma-separated compute dtypes refllama_engine runs in (default: float32,float64)")
    parser.addini("refllama_golden_dir", "directory of golden .npz files, relative to the ini file")
    parser.addini("refllama_backends", "backends refllama_engine runs on", type="args")
    parser.addini("refllama_dtypes", "compute dtypes refllama_engine runs in", type="args")


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    _check_engine_options(config)


_SPECS = pytest.StashKey[list[EngineSpec]]()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise refllama_engine over the engines, unless the test parametrises it itself (indirectly, with
    EngineSpecs, (backend, dtype) pairs or "backend-dtype" ids)."""
    if "refllama_engine" not in metafunc.fixturenames or any(
            "refllama_engine" in _argnames(m) for m in metafunc.definition.iter_markers("parametrize")):
        return
    config = metafunc.config
    if _SPECS not in config.stash:
        config.stash[_SPECS] = selected_engines(config)
    params = [pytest.param(s, id=s.id, marks=backend_marks(s.backend)) for s in config.stash[_SPECS]]
    metafunc.parametrize("refllama_engine", params, indirect=True)


def _argnames(mark: pytest.Mark) -> list[str]:
    names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
    return [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: nothing is probed for tests that will not run
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip marked tests the machine cannot run; skip marks act before any fixture loads an engine."""
    available: dict[str, bool] = {}
    for item in items:
        if item.get_closest_marker("refllama_gpu"):
            if "gpu" not in available:
                available["gpu"] = cuda_device_count() > 0
            if not available["gpu"]:
                item.add_marker(pytest.mark.skip(reason="no CUDA device"))
        if item.get_closest_marker("refllama_mlx"):
            if "mlx" not in available:
                available["mlx"] = mlx_available()
            if not available["mlx"]:
                item.add_marker(pytest.mark.skip(reason="mlx not installed"))


def pytest_itemcollected(item: pytest.Item) -> None:
    """A refllama_engine parameter a test pinned itself gets its backend's marker, as generated ones do (before -m
    selects); one whose backend is registered but does not import here (mlx not installed, say) is skipped with the
    import error."""
    param = getattr(getattr(item, "callspec", None), "params", {}).get("refllama_engine")
    if param is None or isinstance(param, EngineSpec):
        return
    try:
        spec = _as_spec(param)
    except (ValueError, TypeError):
        return  # a malformed pin: the fixture's own error reports it
    if spec.backend not in names():
        return  # an unknown name is a usage error, not a skip: the fixture raises it
    try:
        marks = backend_marks(spec.backend)
    except BackendError as e:
        item.add_marker(pytest.mark.skip(reason=f"{spec.id}: {e}"))
        return
    for mark in marks:
        item.add_marker(mark)


def _as_spec(param: EngineSpec | tuple[str, str] | str) -> EngineSpec:
    if isinstance(param, EngineSpec):
        return param
    backend, dtype = param.split("-", 1) if isinstance(param, str) else param
    return EngineSpec(backend, DataType.parse(dtype).value)


@pytest.fixture(scope="session")
def _refllama_engine_cache() -> EngineCache:
    """The session's loaded engines, shared by refllama_engine and refllama_reference."""
    return EngineCache()


@pytest.fixture
def refllama_engine(request: pytest.FixtureRequest, _refllama_engine_cache: EngineCache) -> EngineFactory:
    """An EngineFactory for this test's (backend, dtype): `refllama_engine(path)` is the loaded engine."""
    return EngineFactory(_as_spec(request.param), _refllama_engine_cache)


@pytest.fixture(scope="session")
def refllama_reference(_refllama_engine_cache: EngineCache) -> EngineFactory:
    """The oracle: `refllama_reference(path)` is the model on the numpy backend in float64."""
    return EngineFactory(EngineSpec("numpy", "float64"), _refllama_engine_cache)


@pytest.fixture(scope="session")
def refllama_golden(pytestconfig: pytest.Config) -> GoldenFiles:
    """The golden files (GoldenFiles); an error naming the options when there is no directory to read."""
    directory = golden_dir(pytestconfig)
    if directory is None:
        pytest.fail("refllama_golden: no golden directory; pass --refllama-golden-dir DIR or set "
                    "refllama_golden_dir in the ini file", pytrace=False)
    if not directory.is_dir():
        pytest.fail(f"refllama_golden: {directory} is not a directory", pytrace=False)
    return GoldenFiles(directory)
