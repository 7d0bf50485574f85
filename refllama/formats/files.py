"""Reading a model folder as untrusted input: names stay inside it, only regular files are opened, reads are
bounded and JSON is strict.

A downloaded model folder is written by someone else. Its files name other files (an index names shards), and
any of them may be a symlink, a named pipe or a huge file. So a file is only ever reached by a name relative to
the folder, and that name must resolve inside the folder: `..`, absolute names and symlinks pointing elsewhere are
refused (unless the caller opts in with `allow_symlinks`). One layout is allowed as it is: the Hugging Face hub
cache, whose `snapshots/<revision>/` folders hold symlinks into the same repository's `blobs/` folder.

Files are opened without blocking (a FIFO named `config.json` would otherwise block `open` forever) and refused
unless they are regular files. JSON objects with a repeated key are refused: which copy wins is up to the reader,
so two readers of one file could see two different models.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from refllama.errors import CheckpointError, RefLlamaError, brief

ErrorFactory = Callable[[str, Path], RefLlamaError]  # (message, path) -> the error to raise

MAX_JSON_BYTES = 256 << 20  # the largest JSON file read whole (tokenizer.json of 256k-token vocabularies: ~35 MB)


def open_regular(path: str | Path, error: ErrorFactory = CheckpointError) -> IO[bytes]:
    """`path` opened for binary reading; `error` if it is missing, unreadable or not a regular file."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error("file not found", path) from None
    except OSError as e:
        raise error(f"cannot open ({e.strerror})", path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error("not a regular file", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class FileMap(mmap.mmap):
    """A read-only map of a whole file that keeps the file open, so its bytes can also be read without mapping them.

    Reading through the map makes the pages part of this process's resident set (the kernel maps whole page-cache
    folios, up to 2 MiB, around each fault); `chunks` reads with pread into one small buffer instead, which is how a
    once-over pass (the finiteness check) leaves the resident set as it found it.
    """

    file: IO[bytes]

    def chunks(self, offset: int, nbytes: int, chunk: int) -> Iterator[memoryview]:
        """The bytes [offset, offset + nbytes) in pieces of at most `chunk` bytes (one buffer, reused)."""
        buffer = bytearray(min(chunk, nbytes))
        view = memoryview(buffer)
        end = offset + nbytes
        while offset < end:
            want = min(chunk, end - offset)
            got = os.preadv(self.file.fileno(), [view[:want]], offset)
            if got <= 0:
                raise OSError(f"file shrank while it was read (at byte {offset})")
            yield view[:got]
            offset += got


def map_file(f: IO[bytes]) -> FileMap:
    """A FileMap of the open file `f` (which may be closed afterwards: the map keeps its own descriptor)."""
    mapped = FileMap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mapped.file = os.fdopen(os.dup(f.fileno()), "rb")
    return mapped


def read_bytes(path: str | Path, limit: int, error: ErrorFactory = CheckpointError) -> bytes:
    """The whole file, refused (before reading) when it is larger than `limit` bytes."""
    path = Path(path)
    with open_regular(path, error) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(f"file of {size} bytes is larger than the {limit}-byte limit for it", path)
        try:
            return f.read(limit + 1)
        except OSError as e:
            raise error(f"cannot read ({e.strerror})", path) from None


def parse_json(raw: bytes | str, path: str | Path, error: ErrorFactory = CheckpointError) -> Any:
    """Strict JSON: UTF-8, no repeated object keys; malformed or too deeply nested input raises `error`."""
    path = Path(path)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise error(f"JSON object repeats the key {brief(e.args[0])}", path) from None
    except UnicodeDecodeError as e:
        raise error(f"not valid JSON (not UTF-8 at byte {e.start})", path) from None
    except json.JSONDecodeError as e:
        raise error(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", path) from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of 10^5 digits, arrays nested 10^5 deep
        raise error(f"not valid JSON ({type(e).__name__}: nested too deeply or a number too long)", path) from None


def read_json(path: str | Path, error: ErrorFactory = CheckpointError, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file read whole (at most `limit` bytes) and parsed strictly (`parse_json`)."""
    return parse_json(read_bytes(path, limit, error), path, error)


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class ModelFolder:
    """A model folder whose files are reached by relative name only, never outside it.

    `allow_symlinks` lets symlinks point anywhere (the user trusts the links in this folder); `..` and absolute
    names are refused either way.
    """

    def __init__(self, path: str | Path, *, allow_symlinks: bool = False):
        self.path = Path(path)
        self.allow_symlinks = allow_symlinks
        real = self.path.resolve()
        self._roots = [real]
        if real.parent.name == "snapshots":  # the Hugging Face hub cache: snapshots/<rev>/x -> ../../blobs/<sha>
            self._roots.append(real.parent.parent / "blobs")

    def file(self, name: str, error: ErrorFactory = CheckpointError) -> Path | None:
        """The path of the file called `name` in this folder, or None when nothing has that name.

        `error` when the name leaves the folder, or when it is a symlink that resolves outside it.
        """
        if not isinstance(name, str) or not name or "\0" in name:
            raise error(f"file name {brief(name)} is not a plain relative name", self.path)
        relative = Path(name)
        if relative.is_absolute() or relative.drive or ".." in relative.parts:
            raise error(f"file name {brief(name)} points outside the model folder", self.path)
        path = self.path / relative
        if not os.path.lexists(path):
            return None
        if not self.allow_symlinks:
            real = path.resolve()
            if not any(real == root or root in real.parents for root in self._roots):
                raise error(f"{brief(name)} is a symlink to a file outside the model folder (pass "
                            "allow_symlinks=True to trust the links in this folder)", self.path)
        return path

    def glob(self, pattern: str, error: ErrorFactory = CheckpointError) -> list[Path]:
        """Files directly in the folder matching `pattern`, each checked as `file` checks it, sorted by name."""
        return [p for p in (self.file(q.name, error) for q in sorted(self.path.glob(pattern))) if p is not None]
