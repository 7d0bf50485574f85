"""GGUF files: header, metadata, tensor infos, and memory-mapped tensor data (versions 2 and 3, little-endian).

Layout (llama.cpp `gguf-py` and `ggml/src/gguf.cpp`): magic "GGUF", u32 version, u64 tensor count, u64
metadata count; metadata as (string key, u32 value type, value); tensor infos as (string name, u32 n_dims,
u64 dims fastest-first, u32 ggml type, u64 offset); then tensor data from the next multiple of
`general.alignment` (default 32), each offset relative to that start. Strings are a u64 byte length and UTF-8.

Dims are listed fastest-varying first, so `shape` here is the reversed list: an HF [out, in] weight stored
with dims [in, out] reads back as (out, in).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refllama.errors import CheckpointError
from refllama.formats.ggml_quants import BLOCK_SIZES, GGMLType, dequantize, tensor_nbytes
from refllama.formats.safetensors import release_pages

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format (scalars) or marker
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9

_PLAIN = {GGMLType.F32: "<f4", GGMLType.F16: "<f2", GGMLType.F64: "<f8", GGMLType.I8: "i1",
          GGMLType.I16: "<i2", GGMLType.I32: "<i4", GGMLType.I64: "<i8"}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]  # NumPy order (slowest first): the reverse of GGUF's dims
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise CheckpointError(f"truncated GGUF file (needed {size} bytes at offset {self.pos})", self.path)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"truncated GGUF file (string of {n} bytes at offset {self.pos})", self.path)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        # Vocabulary entries are meant to be UTF-8; keep any stray bytes rather than fail on them.
        return raw.decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _NUMPY:
                dtype = np.dtype(_NUMPY[etype])
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise CheckpointError(f"truncated GGUF file (array '{key}')", self.path)
                array = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos = end
                return array
            return [self.value(etype, key) for _ in range(count)]
        raise CheckpointError(f"metadata '{key}' has unknown value type {vtype}", self.path)


class GGUFFile:
    """A GGUF file: `metadata` (key -> value; numeric arrays as NumPy arrays), `tensors` (name -> info)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise CheckpointError("file not found", self.path) from None
        except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
            raise CheckpointError(f"cannot map file ({e})", self.path) from None
        cur = _Cursor(self._map, self.path)
        if len(self._map) < 4 or self._map[:4] != MAGIC:
            raise CheckpointError("not a GGUF file (magic bytes are not 'GGUF')", self.path)
        cur.pos = 4
        self.version = cur.take("I")
        if self.version not in (2, 3):
            swapped = struct.unpack("<I", struct.pack(">I", self.version))[0]
            detail = "a big-endian GGUF file" if swapped in (2, 3) else f"GGUF version {self.version}"
            raise CheckpointError(f"{detail} is not supported (little-endian versions 2 and 3 are)", self.path)
        n_tensors, n_kv = cur.take("Q"), cur.take("Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.take("I"), key)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.take("I")
            dims = [cur.take("Q") for _ in range(n_dims)]
            infos.append((name, dims, cur.take("I"), cur.take("Q")))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise CheckpointError(f"general.alignment {alignment} is not a power of two", self.path)
        self.alignment = alignment
        self.data_offset = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, type_id, offset in infos:
            self.tensors[name] = self._tensor_info(name, dims, type_id, offset)

    def _tensor_info(self, name: str, dims: list[int], type_id: int, offset: int) -> GGUFTensorInfo:
        try:
            ggml_type = GGMLType(type_id)
        except ValueError:
            raise CheckpointError(f"unsupported ggml type id {type_id}", self.path, name) from None
        if ggml_type not in BLOCK_SIZES:
            raise CheckpointError(f"unsupported ggml type {ggml_type.name}", self.path, name)
        shape = tuple(int(d) for d in reversed(dims))
        block = BLOCK_SIZES[ggml_type][0]
        if shape and shape[-1] % block:  # ggml quantizes row by row
            raise CheckpointError(f"row length {shape[-1]} is not a multiple of {ggml_type.name}'s block of "
                                  f"{block}", self.path, name)
        try:
            nbytes = tensor_nbytes(ggml_type, int(np.prod(shape, dtype=np.int64)))
        except ValueError as e:
            raise CheckpointError(str(e), self.path, name) from None
        if offset % self.alignment:
            raise CheckpointError(f"data offset {offset} is not aligned to {self.alignment}", self.path, name)
        start = self.data_offset + offset
        if start + nbytes > len(self._map):
            raise CheckpointError(f"data [{start}, {start + nbytes}) runs past the end of the file "
                                  f"({len(self._map)} bytes)", self.path, name)
        return GGUFTensorInfo(name, ggml_type, shape, start, nbytes)

    def _info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError("no such tensor in the GGUF file", self.path, name) from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the map (no copy)."""
        info = self._info(name)
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def get(self, name: str) -> np.ndarray:
        """A plain-typed tensor (F32, F16, F64, integers) as a zero-copy view; quantized types as float32."""
        info = self._info(name)
        if info.ggml_type in _PLAIN:
            return self.raw(name).view(_PLAIN[info.ggml_type]).reshape(info.shape)
        return self.dequantize(name)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array of its NumPy shape (its mapped source pages are let go after)."""
        info = self._info(name)
        raw = self.raw(name)
        out = dequantize(raw, info.ggml_type, info.shape)
        release_pages(raw)
        return out
