"""GGUF files: header, metadata, tensor infos, and memory-mapped tensor data (versions 2 and 3, little-endian).

Layout (llama.cpp `gguf-py` and `ggml/src/gguf.cpp`): magic "GGUF", u32 version, u64 tensor count, u64
metadata count; metadata as (string key, u32 value type, value); tensor infos as (string name, u32 n_dims,
u64 dims fastest-first, u32 ggml type, u64 offset); then tensor data from the next multiple of
`general.alignment` (default 32), each offset relative to that start. Strings are a u64 byte length and UTF-8.

Dims are listed fastest-varying first, so `shape` here is the reversed list: an HF [out, in] weight stored
with dims [in, out] reads back as (out, in).


The file is untrusted input: every count, dimension and offset is checked against the file's real size (in Python
integers, which never wrap) before anything is allocated or looped over; a repeated metadata key or tensor name,
tensors whose data overlap, nested arrays and unsupported tensor types are refused; and the well-known metadata
keys must have the types the GGUF specification gives them (`KEY_TYPES`), so readers of the metadata can trust them.
"""

from __future__ import annotations

import array
import itertools
import math
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refllama.errors import CheckpointError, brief
from refllama.formats.files import map_file, open_regular
from refllama.formats.ggml_quants import BLOCK_SIZES, SUPPORTED_TYPES, GGMLType, dequantize, tensor_nbytes
from refllama.formats.safetensors import release_pages

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format (scalars) or marker
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9

MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_KEY_BYTES = 65535  # the GGUF specification's limit on a key's length

# The types the GGUF specification gives the metadata keys refllama reads ("int": any integer scalar; "number":
# integer or float; "bool"; "str"; arrays as "int[]", "float[]", "str[]"). Architecture keys are listed for llama.
KEY_TYPES = {
    "general.alignment": "int", "general.architecture": "str", "general.name": "str",
    **{f"llama.{k}": "int" for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                                     "attention.head_count", "attention.head_count_kv", "attention.key_length",
                                     "rope.dimension_count", "vocab_size", "rope.scaling.original_context_length")},
    **{f"llama.{k}": "number" for k in ("rope.freq_base", "attention.layer_norm_rms_epsilon",
                                        "rope.scaling.factor")},
    "llama.rope.scaling.type": "str",
    "tokenizer.ggml.model": "str", "tokenizer.ggml.pre": "str", "tokenizer.chat_template": "str",
    "tokenizer.ggml.tokens": "str[]", "tokenizer.ggml.merges": "str[]", "tokenizer.ggml.token_type": "int[]",
    "tokenizer.ggml.scores": "float[]",
    **{f"tokenizer.ggml.{k}_token_id": "int" for k in ("bos", "eos", "eot", "eom", "unknown", "padding", "seperator",
                                                       "separator", "mask", "cls")},
    **{f"tokenizer.ggml.{k}": "bool" for k in ("add_bos_token", "add_eos_token", "add_space_prefix",
                                               "remove_extra_whitespaces")},
}

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
        return math.prod(self.shape)


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def left(self) -> int:
        return self.size - self.pos

    def take(self, fmt: str) -> Any:  # the hot loop of reading a vocabulary: comparisons inlined
        size = struct.calcsize("<" + fmt)
        if self.pos + size > self.size:
            raise CheckpointError(f"truncated GGUF file (needed {size} bytes at offset {self.pos})", self.path)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, limit: int | None = None) -> str:
        n = self.take("Q")
        if self.pos + n > self.size:
            raise CheckpointError(f"truncated GGUF file (string of {n} bytes at offset {self.pos})", self.path)
        if limit is not None and n > limit:
            raise CheckpointError(f"a key of {n} bytes at offset {self.pos} (at most {limit})", self.path)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        # Vocabulary entries are meant to be UTF-8; keep any stray bytes rather than fail on them.
        return raw.decode("utf-8", errors="surrogateescape")

    def strings(self, count: int) -> GGUFStrings:
        """An array of `count` strings (count * 8 <= the bytes left: checked by the caller), located, not decoded."""
        starts, lengths = array.array("q"), array.array("q")
        for _ in range(count):
            n = self.take("Q")
            if self.pos + n > self.size:
                raise CheckpointError(f"truncated GGUF file (string of {n} bytes at offset {self.pos})", self.path)
            starts.append(self.pos)
            lengths.append(n)
            self.pos += n
        return GGUFStrings(self.buf, np.frombuffer(starts, np.int64), np.frombuffer(lengths, np.int64))

    def value(self, vtype: int, key: str, in_array: bool = False) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            if in_array:  # llama.cpp refuses them too; unbounded nesting would exhaust the stack
                raise CheckpointError(f"metadata {brief(key)} nests arrays in arrays (not supported)", self.path)
            etype, count = self.take("I"), self.take("Q")
            smallest = np.dtype(_NUMPY[etype]).itemsize if etype in _NUMPY else 8 if etype in (STRING, ARRAY) else 0
            if smallest and count * smallest > self.left():  # checked before a loop or an array of `count`
                raise CheckpointError(f"truncated GGUF file (array {brief(key)} of {count} items at offset "
                                      f"{self.pos})", self.path)
            if etype in _NUMPY:
                dtype = np.dtype(_NUMPY[etype])
                array = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return array
            if etype == STRING:
                return self.strings(count)
            if etype == ARRAY:
                return [self.value(etype, key, in_array=True) for _ in range(count)]
            raise CheckpointError(f"metadata {brief(key)} is an array of unknown value type {etype}", self.path)
        raise CheckpointError(f"metadata {brief(key)} has unknown value type {vtype}", self.path)


class GGUFStrings(Sequence[str]):
    """A metadata array of strings (a vocabulary, its merges) read in place: each entry is decoded from the mapped
    file when asked for. Held as Python strings, SmolLM2's 49152 tokens and 48900 merges took ~10 MB that
    outlived the tokenizer built from them (their memory pages pinned by later objects); here they take 16 bytes
    an entry, and a reader decodes what it needs, when it needs it."""

    def __init__(self, buf: mmap.mmap, starts: np.ndarray, lengths: np.ndarray):
        self._buf, self._starts, self._lengths = buf, starts, lengths

    def __len__(self) -> int:
        return len(self._starts)

    def _decode(self, i: int) -> str:
        start = int(self._starts[i])
        # Vocabulary entries are meant to be UTF-8; keep any stray bytes rather than fail on them.
        return bytes(self._buf[start:start + int(self._lengths[i])]).decode("utf-8", errors="surrogateescape")

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._decode(j) for j in range(*i.indices(len(self)))]
        return self._decode(range(len(self))[i])  # IndexError outside, negative from the end, as a list

    def __iter__(self) -> Iterator[str]:
        return (self._decode(i) for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (GGUFStrings, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # mutable-sequence semantics, as the list it replaces

    def __repr__(self) -> str:
        return f"GGUFStrings({len(self)} strings)"


def _short(name: str) -> str:
    """A tensor name for an error message (names are the file's: a hostile one may be 64 KiB long)."""
    return name if len(name) <= 200 else name[:200] + "..."


def _check_type(key: str, value: Any, expected: str, path: Path) -> None:
    """Refuse a well-known key whose value has another type than the specification's."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = {
        "int": is_int,
        "number": is_int or isinstance(value, float),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "str[]": isinstance(value, GGUFStrings) or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
        "int[]": isinstance(value, np.ndarray) and value.dtype.kind in "iu",
        "float[]": isinstance(value, np.ndarray) and value.dtype.kind in "fiu",
    }[expected]
    if not ok:
        raise CheckpointError(f"metadata {key!r} must be of type {expected}, not {_type_name(value)}", path)


def _type_name(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype}"
    if isinstance(value, GGUFStrings):
        return "an array of str"
    if isinstance(value, list):
        return "an array of " + (type(value[0]).__name__ if value else "nothing")
    return type(value).__name__


class GGUFFile:
    """A GGUF file: `metadata` (key -> value; numeric arrays as NumPy arrays), `tensors` (name -> info)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open_regular(self.path) as f:
            if os.fstat(f.fileno()).st_size < 4:
                raise CheckpointError("not a GGUF file (shorter than its magic bytes)", self.path)
            try:
                self._map = map_file(f)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"cannot map file ({e})", self.path) from None
        cur = _Cursor(self._map, self.path)
        if self._map[:4] != MAGIC:
            raise CheckpointError("not a GGUF file (magic bytes are not 'GGUF')", self.path)
        cur.pos = 4
        self.version = cur.take("I")
        if self.version not in (2, 3):
            swapped = struct.unpack("<I", struct.pack(">I", self.version))[0]
            detail = "a big-endian GGUF file" if swapped in (2, 3) else f"GGUF version {self.version}"
            raise CheckpointError(f"{detail} is not supported (little-endian versions 2 and 3 are)", self.path)
        n_tensors, n_kv = cur.take("Q"), cur.take("Q")
        # each metadata pair takes at least 13 bytes and each tensor info 24: counts the file cannot hold are
        # refused before any loop runs
        if n_kv * 13 + n_tensors * 24 > cur.left():
            raise CheckpointError(f"the header counts {n_tensors} tensors and {n_kv} metadata keys, more than the "
                                  f"file's {len(self._map)} bytes can hold", self.path)
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string(MAX_KEY_BYTES)
            if key in self.metadata:
                raise CheckpointError(f"metadata key {brief(key)} appears twice", self.path)
            self.metadata[key] = cur.value(cur.take("I"), key)
        for key, expected in KEY_TYPES.items():
            if key in self.metadata:
                _check_type(key, self.metadata[key], expected, self.path)
        infos = []
        for _ in range(n_tensors):
            name = cur.string(MAX_KEY_BYTES)
            n_dims = cur.take("I")
            if n_dims > MAX_DIMS:
                raise CheckpointError(f"{n_dims} dimensions (ggml has at most {MAX_DIMS})", self.path, _short(name))
            dims = [cur.take("Q") for _ in range(n_dims)]
            infos.append((name, dims, cur.take("I"), cur.take("Q")))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
            raise CheckpointError(f"general.alignment {alignment} is not a power of two up to 2^20", self.path)
        self.alignment = alignment
        self.data_offset = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, type_id, offset in infos:
            if name in self.tensors:
                raise CheckpointError("tensor appears twice", self.path, _short(name))
            self.tensors[name] = self._tensor_info(name, dims, type_id, offset)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values() if t.nbytes)
        for (_, end_a, name_a), (begin_b, _, name_b) in itertools.pairwise(spans):
            if begin_b < end_a:
                raise CheckpointError(f"data overlaps tensor {brief(name_a)}", self.path, _short(name_b))

    def release_header(self) -> None:
        """Let go of the header's mapped pages once it has been parsed and checked: a vocabulary and its merges take
        several MiB there (8 for SmolLM2), and what reads them later (a tokenizer built on first use) faults them
        back in from the page cache."""
        release_pages(np.frombuffer(self._map, np.uint8, count=self.data_offset))

    def _tensor_info(self, name: str, dims: list[int], type_id: int, offset: int) -> GGUFTensorInfo:
        try:
            ggml_type = GGMLType(type_id)
        except ValueError:
            ggml_type = None
        if ggml_type not in SUPPORTED_TYPES:
            what = f"ggml type {ggml_type.name}" if ggml_type is not None else f"ggml type id {type_id}"
            names = ", ".join(t.name for t in SUPPORTED_TYPES)
            raise CheckpointError(f"unsupported {what} (supported: {names})", self.path, _short(name))
        shape = tuple(int(d) for d in reversed(dims))
        block = BLOCK_SIZES[ggml_type][0]
        if shape and shape[-1] % block:  # ggml quantizes row by row
            raise CheckpointError(f"row length {shape[-1]} is not a multiple of {ggml_type.name}'s block of "
                                  f"{block}", self.path, _short(name))
        numel = math.prod(shape)  # Python ints: a dimension of 2^64-1 cannot wrap to a small or negative size
        if numel > len(self._map) * 8:  # no type stores more than 8 elements in a byte; don't even size it
            raise CheckpointError(f"shape {list(shape)} holds more elements than the file could store", self.path,
                                  _short(name))
        try:
            nbytes = tensor_nbytes(ggml_type, numel)
        except ValueError as e:
            raise CheckpointError(str(e), self.path, _short(name)) from None
        if offset % self.alignment:
            raise CheckpointError(f"data offset {offset} is not aligned to {self.alignment}", self.path, _short(name))
        start = self.data_offset + offset
        if start + nbytes > len(self._map):
            raise CheckpointError(f"data [{start}, {start + nbytes}) runs past the end of the file "
                                  f"({len(self._map)} bytes)", self.path, _short(name))
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
