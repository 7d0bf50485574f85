"""Zero-copy safetensors reading: headers alone, or read-only NumPy views over a memory map.

The `safetensors` package's NumPy loaders return copies (`load_file` took 190-310 ms on a 487 MB file, reading
every byte) and know nothing of bfloat16 without help; reading the header ourselves and viewing the mapped
file takes under a millisecond and touches only the pages a tensor actually uses. So we parse the format here;
it is an 8-byte length, a JSON header and a flat data region. The package is still used to write files (tools/, tests).
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, Any

import numpy as np

from refllama.errors import CheckpointError, brief
from refllama.formats.files import FileMap, ModelFolder, map_file, open_regular, parse_json, read_json

# safetensors dtype names -> NumPy dtype strings (little-endian, as the format mandates), or for ml_dtypes' types
# their names in ml_dtypes: `numpy_dtype` imports it only when a file holds one (its import is slow).
DTYPES: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
    "BOOL": "?",
}
_ML_DTYPES = ("BF16", "F8_E4M3", "F8_E5M2")


@cache
def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a safetensors dtype name (a key of DTYPES)."""
    if name in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, DTYPES[name]))
    return np.dtype(DTYPES[name])

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype name, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    end: int
    path: Path

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


MAX_DIMS = 32  # NumPy 1.x's limit; real tensors have at most 4


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data: (tensors, __metadata__)."""
    path = Path(path)
    with open_regular(path) as f:
        return _read_header(f, path)


def _read_header(f: IO[bytes], path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError("file too short for a safetensors header", path)
        (hlen,) = struct.unpack("<Q", head)
        if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
            # the length is the file's first 8 bytes: never quoted (of a file that is not safetensors, it is text)
            raise CheckpointError(f"the header length (the first 8 bytes) does not fit the file ({size} bytes; "
                                  f"headers are at most {MAX_HEADER_BYTES}): not a safetensors file?", path)
        raw = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"cannot read ({e.strerror})", path) from None
    header = parse_json(raw, path)
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object", path)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError("__metadata__ must map strings to strings", path)
    data_start = 8 + hlen
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(name, entry, data_start, data_size, path)
    _check_no_overlap(tensors, path)
    return tensors, metadata


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_info(name: str, entry: Any, data_start: int, data_size: int, path: Path) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError("header entry needs dtype, shape and data_offsets", path, name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {brief(dtype)} (supported: {', '.join(DTYPES)})", path, name)
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"invalid shape {brief(shape)} (a list of at most {MAX_DIMS} non-negative integers)",
                              path, name)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise CheckpointError(f"invalid data_offsets {brief(offsets)}", path, name)
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(f"data_offsets {offsets} lie outside the data region ({data_size} bytes)",
                              path, name)
    expected = math.prod(shape) * numpy_dtype(dtype).itemsize  # Python ints: no wrap-around, however large
    if end - begin != expected:
        raise CheckpointError(f"data_offsets span {end - begin} bytes but {dtype}{shape} needs {expected}",
                              path, name)
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end, path)


def _check_no_overlap(tensors: dict[str, TensorInfo], path: Path) -> None:
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_, end_a, name_a), (begin_b, _, name_b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise CheckpointError(f"data overlaps tensor '{name_a}'", path, name_b)


class SafetensorsFile:
    """A safetensors file opened for reading: header parsed and data mapped from one open descriptor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open_regular(self.path) as f:
            self.tensors, self.metadata = _read_header(f, self.path)
            self._map = map_file(f)

    def _mapped(self) -> mmap.mmap:
        return self._map

    def get(self, name: str) -> np.ndarray:
        """A read-only view of the tensor's bytes (no copy; the map lives as long as any view)."""
        try:
            info = self.tensors[name]
        except KeyError:
            raise CheckpointError("no such tensor", self.path, name) from None
        dtype = numpy_dtype(info.dtype)
        if info.numel == 0:
            return np.empty(info.shape, dtype=dtype)
        array = np.frombuffer(self._mapped(), dtype=dtype, count=info.numel, offset=info.begin)
        return array.reshape(info.shape)


def mapped_base(view: np.ndarray) -> FileMap | None:
    """The model file's map an array views (through any chain of views), or None for an array in memory.

    Only a FileMap counts: anonymous memory such as the numba backend's huge-page arena is an `mmap.mmap` too, and
    letting its pages go (`release_pages`) would zero the arrays in it."""
    base = view
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, FileMap) else None


def release_pages(view: np.ndarray) -> None:
    """Drop a mapped tensor's pages from this process's resident set once it has been converted.

    Converting (say bf16 -> float32) reads every page of the source; those clean file-backed pages would stay
    resident while the map lives and push a load's peak RSS to converted + stored bytes. MADV_DONTNEED lets
    them go (a later read simply faults them back in from the page cache). A no-op for anything not a view
    of a map, or where madvise is unavailable.
    """
    base = mapped_base(view)
    if base is None or not hasattr(mmap, "MADV_DONTNEED") or view.nbytes == 0:
        return
    start = view.ctypes.data - np.frombuffer(base, np.uint8).ctypes.data
    page = mmap.PAGESIZE
    first = start // page * page
    last = min(-(-(start + view.nbytes) // page) * page, len(base))
    base.madvise(mmap.MADV_DONTNEED, first, last - first)


class TensorSource:
    """The tensors of a checkpoint folder: one `model.safetensors`, or shards listed by an index file.

    Every file is reached through the folder (`ModelFolder`): an index entry naming a file outside it, or a
    symlink leading out of it, is refused unless `allow_symlinks` (which trusts links, never `..`). `wanted` (a
    predicate on tensor names), with an index, opens only the shards that hold a wanted tensor: a pipeline stage
    needs only its own shard files on disk.
    """

    INDEX = "model.safetensors.index.json"

    def __init__(self, folder: str | Path, wanted: Callable[[str], bool] | None = None, *,
                 allow_symlinks: bool = False):
        self.folder = Path(folder)
        self.model_folder = ModelFolder(self.folder, allow_symlinks=allow_symlinks)
        self.files: dict[Path, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        index_path = self.model_folder.file(self.INDEX)
        if index_path is not None:
            self._open_index(index_path, wanted)
        else:
            single = self.model_folder.file("model.safetensors")
            paths = [single] if single is not None else self.model_folder.glob("*.safetensors")
            if not paths:
                raise CheckpointError("no model.safetensors, index file or *.safetensors files", self.folder)
            for p in paths:
                self._add_file(p)

    def _add_file(self, path: Path) -> SafetensorsFile:
        if path not in self.files:
            st = SafetensorsFile(path)
            self.files[path] = st
            for name in st.tensors:
                if name in self.where and self.where[name] is not st:
                    raise CheckpointError(f"tensor also stored in {self.where[name].path.name}", path, name)
                self.where[name] = st
        return self.files[path]

    def _open_index(self, index_path: Path, wanted: Callable[[str], bool] | None = None) -> None:
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError("index is not JSON with a 'weight_map' object", index_path)
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise CheckpointError(f"{self.INDEX} maps the tensor to {brief(shard)}, not a file name", index_path,
                                      name)
        needed = {shard for name, shard in weight_map.items() if wanted is None or wanted(name)}
        shards: dict[str, Path] = {}
        for name, shard in weight_map.items():
            if shard not in needed:
                continue
            if shard not in shards:
                def entry_error(message: str, _: Path, name: str = name) -> CheckpointError:
                    return CheckpointError(f"{self.INDEX} entry: {message}", index_path, name)

                shard_path = self.model_folder.file(shard, entry_error)
                if shard_path is None:
                    raise CheckpointError(f"shard {brief(shard)} listed in {self.INDEX} is missing", index_path, name)
                shards[shard] = shard_path
            st = self._add_file(shards[shard])
            if name not in st.tensors:
                raise CheckpointError(f"{self.INDEX} places the tensor here but the shard lacks it",
                                      shards[shard], name)
        unindexed = sorted(set(self.where) - set(weight_map))
        if unindexed:
            raise CheckpointError("shards hold tensors the index does not list: "
                                  f"{', '.join(brief(n) for n in unindexed[:5])}", index_path)

    def names(self) -> list[str]:
        return sorted(self.where)

    def info(self, name: str) -> TensorInfo:
        return self.where[name].tensors[name]

    def get(self, name: str) -> np.ndarray:
        try:
            st = self.where[name]
        except KeyError:
            raise CheckpointError("no such tensor in the checkpoint", self.folder, name) from None
        return st.get(name)
