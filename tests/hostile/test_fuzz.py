"""Mutation fuzzing of the parsers a model folder reaches: safetensors, GGUF, config.json, tokenizer files and the
shard index. Hypothesis mutates a small valid file (bit flips, byte writes, truncations, insertions, 4- and 8-byte
fields overwritten with boundary values; JSON values replaced by arbitrary JSON) and the reader must either accept
it or raise a RefLlamaError: any other exception, or an example running past 5 s, fails.

CI runs REFLLAMA_FUZZ_EXAMPLES (default 1000) examples per parser, derandomized: about 90 s on two busy cores.
REFLLAMA_FUZZ_EXAMPLES=20000 (or more) is the thorough run for a local machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refllama.backends import get_backend
from refllama.errors import RefLlamaError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_corpus import SHARDED, TINY, gguf_bytes, spm_vocab_kvs, tiny_gguf_parts, tiny_tokenizer_json  # noqa: E402

EXAMPLES = int(os.environ.get("REFLLAMA_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
TIMEOUT_S = 5
BOUNDARY = [0, 1, 2**7, 2**8 - 1, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**48, 2**63 - 1, 2**63,
            2**64 - 1]


class Hang(BaseException):
    pass


def _alarm(*_):
    raise Hang


def must_refuse_or_accept(fn, *args) -> None:
    """Run fn under a 5 s alarm: success and RefLlamaError are fine; anything else fails the example."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    try:
        fn(*args)
    except RefLlamaError:
        pass
    finally:
        signal.alarm(0)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
    st.tuples(st.just("set"), st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True), st.just(0)),
    st.tuples(st.just("insert"), st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.floats(0, 1, exclude_max=True), st.integers(1, 64)),
    st.tuples(st.just("u32"), st.floats(0, 1, exclude_max=True), st.sampled_from(BOUNDARY)),
    st.tuples(st.just("u64"), st.floats(0, 1, exclude_max=True), st.sampled_from(BOUNDARY)),
)


def mutate(data: bytes, ops: list, head: int) -> bytes:
    """Apply ops; positions are fractions, of the first `head` bytes (where the structure is) for most ops."""
    b = bytearray(data)
    for kind, where, value in ops:
        if not b:
            break
        span = min(head, len(b)) if kind != "truncate" else len(b)
        pos = int(where * span)
        if kind == "flip":
            b[pos] ^= 1 << value
        elif kind == "set":
            b[pos] = value
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = value
        elif kind == "delete":
            del b[pos:pos + value]
        else:
            size = 4 if kind == "u32" else 8
            b[pos:pos + size] = struct.pack("<Q", value)[:size]
    return bytes(b)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20) | st.sampled_from(BOUNDARY),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def paths(node, prefix=()):
    """Every path into a JSON value (dict keys and list indices), the root first."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:50]):
            yield from paths(v, (*prefix, i))


def replace_at(node, path, value):
    if not path:
        return value
    node[path[0]] = replace_at(node[path[0]], path[1:], value)
    return node


json_edits = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), json_values), min_size=1, max_size=3)


def edit_json(data, edits) -> str:
    data = json.loads(json.dumps(data))
    for where, value in edits:
        options = list(paths(data))
        data = replace_at(data, options[int(where * len(options))], value)
    return json.dumps(data)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# --- safetensors -------------------------------------------------------------------------------------------------

ST_BASE = (TINY / "model.safetensors").read_bytes()
ST_HEAD = 8 + struct.unpack("<Q", ST_BASE[:8])[0]


def _read_model(path: Path) -> None:
    """Read a model folder or GGUF file as `refllama.load` does (every fuzz target's loader)."""
    from refllama.loading import read_model

    read_model(path, get_backend("numpy", "float32"))


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=6))
def test_fuzz_safetensors(work, ops):
    folder = work / "st"
    if not folder.exists():
        shutil.copytree(TINY, folder)
    (folder / "model.safetensors").write_bytes(mutate(ST_BASE, ops, ST_HEAD))
    must_refuse_or_accept(_read_model, folder)


# --- GGUF --------------------------------------------------------------------------------------------------------

_kvs, _tensors = tiny_gguf_parts()
GGUF_BASE = gguf_bytes([*_kvs, *spm_vocab_kvs()], _tensors)
# metadata and tensor infos: the same file without tensor data (offsets are fixed-width fields)
GGUF_HEAD = len(gguf_bytes([*_kvs, *spm_vocab_kvs()], [(n, d, t, b"") for n, d, t, _ in _tensors]))


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=6))
def test_fuzz_gguf(work, ops):
    path = work / "model.gguf"
    path.write_bytes(mutate(GGUF_BASE, ops, GGUF_HEAD))
    must_refuse_or_accept(_read_model, path)


# --- config.json, the index, tokenizer files (JSON values and bytes) ---------------------------------------------

CONFIG = json.loads((TINY / "config.json").read_text())


def _config(text: str) -> None:
    from refllama.config import LlamaConfig
    from refllama.formats.files import parse_json

    LlamaConfig.from_dict(parse_json(text.encode(), "config.json"), source="config.json")


@FUZZ
@given(edits=json_edits, ops=st.lists(mutation, max_size=2))
def test_fuzz_config(edits, ops):
    text = edit_json(CONFIG, edits)
    must_refuse_or_accept(_config, mutate(text.encode(), ops, len(text)).decode("utf-8", "replace"))


INDEX = json.loads((SHARDED / "model.safetensors.index.json").read_text())


def _tensor_source(folder: Path) -> None:
    from refllama.formats.safetensors import TensorSource

    TensorSource(folder)


@FUZZ
@given(edits=json_edits, ops=st.lists(mutation, max_size=2))
def test_fuzz_index(work, edits, ops):
    folder = work / "sharded"
    if not folder.exists():
        shutil.copytree(SHARDED, folder)
    text = edit_json(INDEX, edits).encode()
    (folder / "model.safetensors.index.json").write_bytes(mutate(text, ops, len(text)))
    must_refuse_or_accept(_tensor_source, folder)


TOKENIZER = tiny_tokenizer_json()


def _tokenizer(folder: Path) -> None:
    from refllama.formats.tokenizer import load_tokenizer

    load_tokenizer(folder)


@FUZZ
@given(edits=json_edits, ops=st.lists(mutation, max_size=2))
def test_fuzz_tokenizer_json(work, edits, ops):
    folder = work / "tok-json"
    folder.mkdir(exist_ok=True)
    text = edit_json(TOKENIZER, edits).encode()
    (folder / "tokenizer.json").write_bytes(mutate(text, ops, len(text)))
    must_refuse_or_accept(_tokenizer, folder)


def _spm_bytes() -> bytes:
    from refllama.formats.tokenizer import sentencepiece_proto_from_gguf

    metadata = {k: (v[1] if t == 9 else v) for k, t, v in spm_vocab_kvs()}
    import numpy as np

    metadata["tokenizer.ggml.scores"] = np.asarray(metadata["tokenizer.ggml.scores"], np.float32)
    metadata["tokenizer.ggml.token_type"] = np.asarray(metadata["tokenizer.ggml.token_type"], np.int32)
    return sentencepiece_proto_from_gguf(metadata)


SPM = _spm_bytes()
TIKTOKEN = b"".join(__import__("base64").b64encode(bytes([i])) + b" %d\n" % i for i in range(64))


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=6), tiktoken=st.booleans())
def test_fuzz_tokenizer_model(work, ops, tiktoken):
    folder = work / "tok-model"
    folder.mkdir(exist_ok=True)
    base = TIKTOKEN if tiktoken else SPM
    (folder / "tokenizer.model").write_bytes(mutate(base, ops, len(base)))
    must_refuse_or_accept(_tokenizer, folder)
