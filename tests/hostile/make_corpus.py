"""Write the hostile-input corpus: malformed or hostile model folders, GGUF files, configs, tokenizers, chat
templates and API arguments, each made from a small valid checkpoint with one thing wrong.

    python tests/hostile/make_corpus.py OUT_DIR      # writes OUT_DIR/<case>/... and OUT_DIR/manifest.json

Every case names the call to make (`action`, run by tests/hostile/run_cases.py), the refllama error type it must
raise and words its message must contain (`words`) or must not (`forbid`); `expect: "ok"` cases must succeed (and
pass their `check`). The classes: path traversal and leaks, unbounded work or memory from one field, integer
wrap-around, silent wrong answers (NaN/Inf, duplicates, overlaps, out-of-range ids), untyped errors from wrong
JSON/metadata types, runaway chat templates, and bad API arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "tinyllama"  # f16, 2 layers, hidden 64, vocab 64, context 128
SHARDED = ROOT / "tests" / "fixtures" / "sharded"

# --- raw file writers (byte-exact control: the point is to write what real writers refuse to) --------------------


def safetensors_bytes(header: Any, data: bytes, header_raw: bytes | None = None) -> bytes:
    raw = header_raw if header_raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q", F64: "d"}


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gval(vtype: int, value: Any) -> bytes:
    """A metadata value of `vtype` (arrays: value = (element type, [items]))."""
    if vtype == STR:
        return gstr(value)
    if vtype == ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(gval(etype, v) for v in items)
    return struct.pack("<" + _FMT[vtype], value)


def gguf_bytes(kvs: list[tuple[str, int, Any]], tensors: list[tuple[str, list[int], int, bytes]], *,
               alignment: int = 32, version: int = 3, n_tensors: int | None = None, n_kv: int | None = None,
               offsets: list[int] | None = None, raw_kv: bytes | None = None) -> bytes:
    """A GGUF file: metadata (key, type, value), tensors (name, GGUF dims fastest first, ggml type, data)."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                len(kvs) if n_kv is None else n_kv)
    out += raw_kv if raw_kv is not None else b"".join(gstr(k) + struct.pack("<I", t) + gval(t, v) for k, t, v in kvs)
    auto, pos = [], 0
    for _, _, _, data in tensors:
        auto.append(pos)
        pos += -(-len(data) // alignment) * alignment
    offsets = auto if offsets is None else offsets
    for (name, dims, ttype, _), off in zip(tensors, offsets, strict=True):
        out += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, off)
    out += b"\0" * (-len(out) % alignment)
    blob = bytearray(out)
    for (_, _, _, data), off in zip(tensors, auto, strict=True):
        blob += b"\0" * (len(out) + off - len(blob)) + data
    return bytes(blob)


GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def tiny_gguf_parts() -> tuple[list, list]:
    """The tiny fixture as GGUF metadata and F32 tensors (llama names; values as stored, not permuted)."""
    from safetensors.numpy import load_file

    cfg = json.loads((TINY / "config.json").read_text())
    kvs = [("general.architecture", STR, "llama"), ("llama.context_length", U32, cfg["max_position_embeddings"]),
           ("llama.embedding_length", U32, cfg["hidden_size"]), ("llama.block_count", U32, cfg["num_hidden_layers"]),
           ("llama.feed_forward_length", U32, cfg["intermediate_size"]),
           ("llama.attention.head_count", U32, cfg["num_attention_heads"]),
           ("llama.attention.head_count_kv", U32, cfg["num_key_value_heads"]),
           ("llama.rope.freq_base", F32, 10000.0), ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
           ("llama.vocab_size", U32, cfg["vocab_size"]), ("tokenizer.ggml.bos_token_id", U32, 1),
           ("tokenizer.ggml.eos_token_id", U32, 2)]
    tensors = []
    for name, array in sorted(load_file(str(TINY / "model.safetensors")).items()):
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            module = ".".join(rest[:-1])
            gname = f"blk.{i}.{GGUF_LAYER[module]}.{rest[-1]}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        tensors.append((gname, list(reversed(array.shape)), 0, array.astype("<f4").tobytes()))
    return kvs, tensors


def spm_vocab_kvs() -> list[tuple[str, int, Any]]:
    """A small 'llama' (sentencepiece) vocabulary of 64 tokens: <unk> <s> </s>, 256 would be too many bytes."""
    tokens = ["<unk>", "<s>", "</s>", *[f"▁{c}" for c in "abcdefghijklmnopqrstuvwxyz"],
              *list("abcdefghijklmnopqrstuvwxyz"), "▁", "ab", "cd", "ef", "gh", "ij", "kl", "mn"][:64]
    types = [2, 3, 3] + [1] * (len(tokens) - 3)
    return [("tokenizer.ggml.model", STR, "llama"), ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
            ("tokenizer.ggml.scores", ARR, (F32, [float(-i) for i in range(len(tokens))])),
            ("tokenizer.ggml.token_type", ARR, (I32, types))]


def tiny_tokenizer_json(n: int = 60) -> dict:
    """A byte-free BPE tokenizer.json of `n` tokens (made by the tokenizers library)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in letters + letters.upper() + "0123456789 .,":
        if len(vocab) < n:
            vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return json.loads(tok.to_str())


# --- the corpus -------------------------------------------------------------------------------------------------


class Corpus:
    def __init__(self, out: Path):
        self.out = out
        self.cases: list[dict] = []

    def add(self, name: str, action: str, path: Path | str | None = None, *, expect: str, words: tuple = (),
            forbid: tuple = (), args: dict | None = None, check: str | None = None) -> None:
        assert all(c["name"] != name for c in self.cases), name
        self.cases.append({"name": name, "action": action, "path": str(path) if path is not None else None,
                           "args": args or {}, "expect": expect, "words": list(words), "forbid": list(forbid),
                           "check": check})

    def folder(self, name: str, base: Path = TINY) -> Path:
        d = self.out / name
        shutil.copytree(base, d)
        return d


def build(out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    c = Corpus(out)
    outside = out / "_outside"
    outside.mkdir()
    secret = outside / "passwd"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    shutil.copy(SHARDED / "model-00001-of-00002.safetensors", outside / "shard.safetensors")
    _paths(c, outside, secret)
    _safetensors(c)
    _configs(c)
    _gguf(c)
    _tokenizers(c, outside)
    _templates(c)
    _api(c)
    (out / "manifest.json").write_text(json.dumps(c.cases, indent=1))
    return c.cases


def _index(c: Corpus, name: str, edit, **kw) -> None:
    d = c.folder(name, SHARDED)
    p = d / "model.safetensors.index.json"
    data = json.loads(p.read_text())
    text = edit(data, d)
    p.write_text(text if isinstance(text, str) else json.dumps(data))
    c.add(name, "load", d, **kw)


def _first(data: dict) -> str:
    return next(iter(data["weight_map"]))


def _paths(c: Corpus, outside: Path, secret: Path) -> None:
    E = "CheckpointError"
    for i, target in enumerate(["../_outside/shard.safetensors", str(outside / "shard.safetensors"), "a/../../x",
                                "../../../../../../etc/passwd", "/etc/passwd", "./../_outside/passwd"]):
        _index(c, f"index-escape-{i}", lambda d, _, t=target: d["weight_map"].__setitem__(_first(d), t),
               expect=E, words=("outside the model folder", "model.safetensors.index.json"), forbid=("root:x",))
    _index(c, "index-secret-inside", lambda d, f: (shutil.copy(secret, f / "notes.txt"),
                                                    d["weight_map"].__setitem__(_first(d), "notes.txt")),
           expect=E, words=("notes.txt", "header length"), forbid=("3475222254926655346", "root:x"))
    _index(c, "index-shard-int", lambda d, _: d["weight_map"].__setitem__(_first(d), 7), expect=E,
           words=("not a file name",))
    _index(c, "index-shard-list", lambda d, _: d["weight_map"].__setitem__(_first(d), []), expect=E,
           words=("not a file name",))
    _index(c, "index-shard-nul", lambda d, _: d["weight_map"].__setitem__(_first(d), "a\0b"), expect=E,
           words=("plain relative name",))
    _index(c, "index-shard-empty", lambda d, _: d["weight_map"].__setitem__(_first(d), ""), expect=E,
           words=("plain relative name",))
    _index(c, "index-weight-map-list", lambda d, _: d.__setitem__("weight_map", []), expect=E, words=("weight_map",))
    _index(c, "index-not-json", lambda d, _: "{\"weight_map\": ", expect=E, words=("not valid JSON",))
    _index(c, "index-deep", lambda d, _: "[" * 100000 + "]" * 100000, expect=E, words=("not valid JSON",))
    _index(c, "index-duplicate-key",
           lambda d, _: '{"weight_map": {"a": "x", "a": "y"}}', expect=E, words=("repeats the key",))
    _index(c, "index-missing-shard", lambda d, _: d["weight_map"].__setitem__(_first(d), "nope.safetensors"),
           expect=E, words=("missing",))
    # symlinks and special files
    d = c.folder("symlink-shard-out", SHARDED)
    (d / "model-00001-of-00002.safetensors").unlink()
    os.symlink(outside / "shard.safetensors", d / "model-00001-of-00002.safetensors")
    c.add("symlink-shard-out", "load", d, expect=E, words=("symlink", "outside the model folder"))
    c.add("symlink-shard-out-allowed", "load", d, expect="ok", args={"allow_symlinks": True})
    d = c.folder("symlink-shard-inside", SHARDED)
    (d / "sub").mkdir()
    os.rename(d / "model-00001-of-00002.safetensors", d / "sub" / "s.safetensors")
    os.symlink("sub/s.safetensors", d / "model-00001-of-00002.safetensors")
    c.add("symlink-shard-inside", "load", d, expect="ok")
    d = c.folder("symlink-config-out")
    (d / "config.json").unlink()
    os.symlink(secret, d / "config.json")
    c.add("symlink-config-out", "load", d, expect="ConfigError", words=("symlink",), forbid=("root:x",))
    d = c.folder("symlink-index-out", SHARDED)
    (outside / "index.json").write_text((d / "model.safetensors.index.json").read_text())
    (d / "model.safetensors.index.json").unlink()
    os.symlink(outside / "index.json", d / "model.safetensors.index.json")
    c.add("symlink-index-out", "load", d, expect=E, words=("symlink",))
    d = c.folder("symlink-tokenizer-out")
    os.symlink(secret, d / "tokenizer.json")
    c.add("symlink-tokenizer-out", "load", d, expect="TokenizerError", words=("symlink",), forbid=("root:x",))
    for name, target in (("fifo-weights", "model.safetensors"), ("fifo-config", "config.json"),
                         ("fifo-tokenizer", "tokenizer.json"), ("fifo-generation-config", "generation_config.json")):
        d = c.folder(name)
        if (d / target).exists():
            (d / target).unlink()
        os.mkfifo(d / target)
        err = {"config.json": "ConfigError", "generation_config.json": "ConfigError",
               "tokenizer.json": "TokenizerError"}.get(target, E)
        c.add(name, "load", d, expect=err, words=("not a regular file", target))
    d = c.folder("dir-as-weights")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()
    c.add("dir-as-weights", "load", d, expect=E, words=("not a regular file",))
    d = c.folder("no-weights")
    (d / "model.safetensors").unlink()
    c.add("no-weights", "load", d, expect=E, words=("no model.safetensors",))
    fifo = c.out / "fifo.gguf"
    os.mkfifo(fifo)
    c.add("fifo-gguf", "load", fifo, expect=E, words=("not a model folder",))
    c.add("gguf-reader-fifo", "gguf", fifo, expect=E, words=("not a regular file",))
    c.add("missing-path", "load", c.out / "does-not-exist", expect=E, words=("not a model folder",))


def _header_case(c: Corpus, name: str, edit, *, expect: str = "CheckpointError", words: tuple = (),
                 action: str = "load", raw: bytes | None = None) -> None:
    d = c.folder(name)
    p = d / "model.safetensors"
    header, data = read_safetensors(p)
    result = edit(header, data)
    if isinstance(result, bytes):
        p.write_bytes(result)
    else:
        p.write_bytes(safetensors_bytes(header, result if result is not None else data))
    c.add(name, action, d, expect=expect, words=words)


def _set(entry: str, key: str, value: Any):
    def edit(h: dict, data: bytes) -> None:
        h[entry][key] = value
    return edit


def _safetensors(c: Corpus) -> None:
    T = "model.layers.0.mlp.up_proj.weight"
    for i, dtype in enumerate([["F32"], {"a": 1}, "F128", 3, None, "f16"]):
        _header_case(c, f"st-dtype-{i}", _set(T, "dtype", dtype), words=("unsupported dtype", T))
    for i, shape in enumerate([[-2, 64], [2.5, 64], "128,64", [2**32, 2**32], [0] * 40, [True, 64], [2**64, 1],
                               None, [[128], 64]]):
        _header_case(c, f"st-shape-{i}", _set(T, "shape", shape), words=(T,))
    for i, offs in enumerate([[0], [-1, 5], [0, 10**12], [100, 50], [0.0, 16384], ["0", "16384"], None,
                              [0, 2**64 + 16384]]):
        _header_case(c, f"st-offsets-{i}", _set(T, "data_offsets", offs), words=(T,))

    def overlap(h, data):
        h[T]["data_offsets"] = list(h["model.layers.0.mlp.gate_proj.weight"]["data_offsets"])
    _header_case(c, "st-overlap", overlap, words=("overlaps",))

    def span(h, data):
        b, e = h[T]["data_offsets"]
        h[T]["data_offsets"] = [b, e - 2]
    _header_case(c, "st-span-short", span, words=("span", T))
    _header_case(c, "st-entry-missing-keys", lambda h, d: h.__setitem__(T, {"dtype": "F16"}), words=("needs",))
    _header_case(c, "st-entry-list", lambda h, d: h.__setitem__(T, [1, 2]), words=("needs",))
    _header_case(c, "st-metadata-list", lambda h, d: h.__setitem__("__metadata__", [1]), words=("__metadata__",))
    _header_case(c, "st-metadata-nonstring", lambda h, d: h.__setitem__("__metadata__", {"a": 1}),
                 words=("__metadata__",))
    _header_case(c, "st-header-array", lambda h, d: safetensors_bytes(None, d, b"[1, 2]"), words=("JSON object",))
    _header_case(c, "st-header-garbage", lambda h, d: safetensors_bytes(None, d, b"\xff\xfe{]"),
                 words=("not valid JSON",))
    _header_case(c, "st-header-deep", lambda h, d: safetensors_bytes(None, d, b"[" * 50000 + b"]" * 50000),
                 words=("not valid JSON",))
    _header_case(c, "st-header-long-number", lambda h, d: safetensors_bytes(None, d, b'{"a": ' + b"9" * 50000 + b"}"),
                 words=("not valid JSON",))
    _header_case(c, "st-header-duplicate", lambda h, d: safetensors_bytes(
        None, d, json.dumps(h).encode()[:-1] + b', "' + T.encode() + b'": ' + json.dumps(h[T]).encode() + b"}"),
        words=("repeats the key",))
    _header_case(c, "st-header-length-huge", lambda h, d: struct.pack("<Q", 2**63) + b"{}",
                 words=("does not fit",))
    _header_case(c, "st-header-length-past-end", lambda h, d: struct.pack("<Q", 10**6) + b"{}" + d[:10],
                 words=("does not fit",))
    _header_case(c, "st-too-short", lambda h, d: b"\x01\x02", words=("too short",))
    _header_case(c, "st-empty-file", lambda h, d: b"", words=("too short",))
    _header_case(c, "st-truncated-data", lambda h, d: safetensors_bytes(h, d[: len(d) // 2]), words=("outside",))
    _header_case(c, "st-text-file", lambda h, d: b"root:x:0:0:root:/root:/bin/bash\n", words=("does not fit",))
    # the checkpoint disagrees with config.json
    _header_case(c, "st-missing-tensor", lambda h, d: h.pop(T) and None, expect="WeightError", words=("missing", T))

    def extra(h, data):
        h["model.layers.9.mlp.up_proj.weight"] = dict(h["model.norm.weight"], data_offsets=[len(data), len(data)],
                                                       shape=[0])
    _header_case(c, "st-unexpected-tensor", extra, expect="WeightError", words=("unexpected",))

    def int8(h, data):
        h[T]["dtype"] = "I8"
        b, _ = h[T]["data_offsets"]
        n = 128 * 64
        h[T]["data_offsets"] = [b, b + n]  # the first half of its old bytes, as int8
    _header_case(c, "st-int8-as-float", int8, expect="WeightError", words=("I8", T))

    def wrong_shape(h, data):
        h[T]["shape"] = [64, 128]
    _header_case(c, "st-wrong-shape", wrong_shape, expect="WeightError", words=("shape", T))
    # non-finite weights: silent NaN logits without the check
    for i, (tensor, value) in enumerate([(T, np.nan), (T, np.inf), ("model.norm.weight", -np.inf),
                                         ("model.embed_tokens.weight", np.nan), ("lm_head.weight", np.inf)]):
        def poison(h, data, tensor=tensor, value=value):
            b, e = h[tensor]["data_offsets"]
            arr = np.frombuffer(data[b:e], np.float16).copy()
            arr[len(arr) // 3] = value
            return safetensors_bytes(h, data[:b] + arr.tobytes() + data[e:])
        _header_case(c, f"st-nonfinite-{i}", poison, expect="NumericalError", words=(tensor, "NaN or infinite"))


def _config(c: Corpus, name: str, edit, *, expect: str = "ConfigError", words: tuple = (), file: str = "config.json",
            raw: str | None = None, args: dict | None = None, action: str = "load") -> None:
    d = c.folder(name)
    p = d / file
    if raw is not None:
        p.write_text(raw)
    else:
        data = json.loads(p.read_text()) if p.exists() else {}
        edit(data)
        p.write_text(json.dumps(data))
    c.add(name, action, d, expect=expect, words=words, args=args)


def _configs(c: Corpus) -> None:
    def put(key, value):
        return lambda d: d.__setitem__(key, value)
    for key, values in {
        "num_hidden_layers": [10**9, 10**12, 0, -1, "2", 2.5, True, None, [2]],
        "vocab_size": [10**12, 0, "64"],
        "hidden_size": [10**7, -64, {"a": 1}],
        "intermediate_size": [2**40],
        "max_position_embeddings": [10**12, 0, 1.5],
        "num_attention_heads": [0, 10**6],
        "num_key_value_heads": [3, 10**9],
        "head_dim": [7, 2**31],
        "rms_norm_eps": ["abc", -1, 0, 10**400, [1e-5]],
        "rope_theta": [0, -5, "1e4"],
        "hidden_act": ["evil", ["silu"], 3],
        "tie_word_embeddings": ["yes", 1],
        "eos_token_id": [10**6, "2", [1, "a"], [2, 64], -1, 2.0],
        "bos_token_id": [-1, 64, [1, 2]],
        "pad_token_id": [99999],
        "rope_scaling": [[1, 2], {"rope_type": "yarn", "factor": 2.0}, {"rope_type": "llama3", "factor": 8.0},
                         {"type": "linear", "factor": "x"}, {"type": "dynamic", "factor": 0.5},
                         {"rope_type": ["linear"], "factor": 2.0}],
        "quantization_config": [[1], {"quant_method": "compressed-tensors", "config_groups": [1]},
                                {"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": 5}}},
                                {"quant_method": "compressed-tensors",
                                 "config_groups": {"g": {"targets": ["re:(.*)*x"], "weights": {"num_bits": 8}}}},
                                {"quant_method": "compressed-tensors",
                                 "config_groups": {"g": {"targets": ["re:(unclosed"], "weights": {"num_bits": 8}}}},
                                {"quant_method": "gptq", "bits": "4"}, {"quant_method": "gptq", "bits": 4,
                                                                        "group_size": [32]},
                                {"quant_method": "evil"}],
    }.items():
        for i, value in enumerate(values):
            field = key if key != "quantization_config" else "quantization_config"
            _config(c, f"config-{key}-{i}", put(key, value), words=(field,))
    _config(c, "config-not-json", None, raw="{not json", words=("not valid JSON",))
    _config(c, "config-array", None, raw="[1, 2]", words=("JSON object",))
    _config(c, "config-empty", None, raw="", words=("not valid JSON",))
    _config(c, "config-duplicate", None, raw='{"vocab_size": 64, "vocab_size": 10}', words=("repeats the key",))
    _config(c, "config-deep", None, raw="[" * 100000 + "]" * 100000, words=("not valid JSON",))
    _config(c, "config-huge", None, raw='{"x": "' + "a" * (17 << 20) + '"}', words=("larger than",))
    _config(c, "config-nan-eps", None, raw=(TINY / "config.json").read_text().replace("1e-05", "NaN"),
            words=("rms_norm_eps",))
    _config(c, "config-generation-eos-outside", put("eos_token_id", [2, 1000]), file="generation_config.json",
            words=("eos_token_id", "outside the vocabulary"))
    _config(c, "config-generation-array", None, file="generation_config.json", raw="[]", words=("JSON object",))
    d = c.folder("config-missing")
    (d / "config.json").unlink()
    c.add("config-missing", "load", d, expect="ConfigError", words=("not found",))
    _config(c, "config-torch-dtype-list", put("torch_dtype", ["float16"]), expect="ok")


def _gguf_case(c: Corpus, name: str, blob: bytes, *, expect: str = "CheckpointError", words: tuple = (),
               action: str = "load", args: dict | None = None) -> None:
    p = c.out / f"{name}.gguf"
    p.write_bytes(blob)
    c.add(name, action, p, expect=expect, words=words, args=args)


def _with(kvs: list, key: str, vtype: int | None = None, value: Any = None) -> list:
    """kvs with `key` replaced (or removed when vtype is None, or appended when absent)."""
    out = [kv for kv in kvs if kv[0] != key]
    return out if vtype is None else [*out, (key, vtype, value)]


def _gguf(c: Corpus) -> None:
    kvs, tensors = tiny_gguf_parts()
    good = gguf_bytes(kvs, tensors)
    _gguf_case(c, "gguf-valid", good, expect="ok")
    _gguf_case(c, "gguf-bad-magic", b"GGUX" + good[4:], words=("not a GGUF file",))
    _gguf_case(c, "gguf-too-short", b"GG", words=("not a GGUF file",))
    _gguf_case(c, "gguf-version-4", gguf_bytes(kvs, tensors, version=4), words=("version 4",))
    _gguf_case(c, "gguf-big-endian", b"GGUF" + struct.pack(">I", 3) + good[8:], words=("big-endian",))
    _gguf_case(c, "gguf-truncated-header", good[:20], words=("truncated",))
    _gguf_case(c, "gguf-n-tensors-huge", gguf_bytes(kvs, tensors, n_tensors=2**63), words=("can hold",))
    _gguf_case(c, "gguf-n-kv-huge", gguf_bytes(kvs, tensors, n_kv=2**64 - 1), words=("can hold",))
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    _gguf_case(c, "gguf-key-length-huge", head + struct.pack("<Q", 2**40) + b"abc" + b"\0" * 32,
               words=("truncated",))
    _gguf_case(c, "gguf-key-length-over-limit", head + gstr("k" * 70000) + struct.pack("<I", U8) + b"\0",
               words=("at most",))
    _gguf_case(c, "gguf-string-length-huge", head + gstr("k") + struct.pack("<IQ", STR, 2**62),
               words=("truncated",))
    _gguf_case(c, "gguf-array-count-huge", head + gstr("k") + struct.pack("<IIQ", ARR, U32, 2**61),
               words=("truncated",))
    _gguf_case(c, "gguf-array-strings-count-huge", head + gstr("k") + struct.pack("<IIQ", ARR, STR, 2**50),
               words=("truncated",))
    nested = struct.pack("<IQ", ARR, 1) * 2000 + struct.pack("<IQ", U8, 0)
    _gguf_case(c, "gguf-nested-arrays", head + gstr("k") + struct.pack("<I", ARR) + nested, words=("nests",))
    _gguf_case(c, "gguf-array-unknown-type", head + gstr("k") + struct.pack("<IIQ", ARR, 99, 1) + b"\0" * 8,
               words=("unknown value type",))
    _gguf_case(c, "gguf-unknown-value-type", head + gstr("k") + struct.pack("<I", 77), words=("unknown value type",))
    _gguf_case(c, "gguf-duplicate-key", gguf_bytes([*kvs, ("llama.block_count", U32, 2)], tensors),
               words=("appears twice", "llama.block_count"))
    _gguf_case(c, "gguf-duplicate-tensor", gguf_bytes(kvs, [*tensors, tensors[0]]), words=("appears twice",))
    for i, (vtype, value) in enumerate([(STR, "32"), (U32, 0), (U32, 3), (U64, 2**40), (F32, 32.0)]):
        _gguf_case(c, f"gguf-alignment-{i}", gguf_bytes(_with(kvs, "general.alignment", vtype, value), tensors),
                   words=("general.alignment",))
    for i, (vtype, value) in enumerate([(U32, 10**9), (U64, 10**12), (STR, "2"), (U32, 0), (F32, 2.0),
                                        (ARR, (U32, [2])), (I32, -1)]):
        _gguf_case(c, f"gguf-block-count-{i}", gguf_bytes(_with(kvs, "llama.block_count", vtype, value), tensors),
                   expect="CheckpointError" if vtype in (STR, F32, ARR) else "ConfigError",
                   words=("llama.block_count",))
    _gguf_case(c, "gguf-context-huge", gguf_bytes(_with(kvs, "llama.context_length", U64, 2**40), tensors),
               expect="ConfigError", words=("llama.context_length",))
    _gguf_case(c, "gguf-embedding-mismatch", gguf_bytes(_with(kvs, "llama.embedding_length", U32, 32), tensors),
               expect="WeightError", words=("shape",))
    _gguf_case(c, "gguf-no-architecture", gguf_bytes(_with(kvs, "general.architecture"), tensors),
               expect="ConfigError", words=("general.architecture",))
    _gguf_case(c, "gguf-architecture-gpt2", gguf_bytes(_with(kvs, "general.architecture", STR, "gpt2"), tensors),
               expect="ConfigError", words=("general.architecture",))
    _gguf_case(c, "gguf-architecture-int", gguf_bytes(_with(kvs, "general.architecture", U32, 1), tensors),
               words=("general.architecture",))
    _gguf_case(c, "gguf-eos-string", gguf_bytes(_with(kvs, "tokenizer.ggml.eos_token_id", STR, "2"), tensors),
               words=("tokenizer.ggml.eos_token_id",))
    _gguf_case(c, "gguf-eos-outside", gguf_bytes(_with(kvs, "tokenizer.ggml.eos_token_id", U32, 5000), tensors),
               expect="ConfigError", words=("tokenizer.ggml.eos_token_id", "outside"))
    _gguf_case(c, "gguf-rope-base-string", gguf_bytes(_with(kvs, "llama.rope.freq_base", STR, "1e4"), tensors),
               words=("llama.rope.freq_base",))
    _gguf_case(c, "gguf-eps-nan", gguf_bytes(_with(kvs, "llama.attention.layer_norm_rms_epsilon", F32,
                                                   float("nan")), tensors),
               expect="ConfigError", words=("layer_norm_rms_epsilon",))

    def tensor_edit(i, **kw):
        name, dims, ttype, data = tensors[i]
        changed = {"name": name, "dims": dims, "ttype": ttype, "data": data, **kw}
        return [*tensors[:i], (changed["name"], changed["dims"], changed["ttype"], changed["data"]), *tensors[i + 1:]]
    _gguf_case(c, "gguf-five-dims", gguf_bytes(kvs, tensor_edit(0, dims=[1, 1, 1, 1, 1])), words=("dimensions",))
    _gguf_case(c, "gguf-dim-max", gguf_bytes(kvs, tensor_edit(0, dims=[2**64 - 1, 64])), words=("more elements",))
    _gguf_case(c, "gguf-dims-wrap", gguf_bytes(kvs, tensor_edit(0, dims=[2**32, 2**32])), words=("more elements",))
    _gguf_case(c, "gguf-dims-wrap-to-zero", gguf_bytes(kvs, tensor_edit(0, dims=[2**33, 2**31, 4])),
               words=("more elements",))
    _gguf_case(c, "gguf-type-unknown", gguf_bytes(kvs, tensor_edit(0, ttype=999)), words=("unsupported", "Q8_0"))
    _gguf_case(c, "gguf-type-q8_1", gguf_bytes(kvs, tensor_edit(0, ttype=9, data=b"\0" * 40 * 2)),
               words=("Q8_1", "supported"))
    _gguf_case(c, "gguf-type-q8_1-block", gguf_bytes(kvs, tensor_edit(0, ttype=9)), words=("Q8_1",))
    i8 = next(i for i, t in enumerate(tensors) if t[0] == "blk.0.ffn_up.weight")
    _gguf_case(c, "gguf-int8-as-float", gguf_bytes(kvs, tensor_edit(i8, ttype=24, data=tensors[i8][3][:128 * 64])),
               expect="WeightError", words=("I8", "float weights"))
    _gguf_case(c, "gguf-offset-unaligned", gguf_bytes(kvs, tensors, offsets=[0] + [o + 4 for o in _offs(tensors)[1:]]),
               words=("not aligned",))
    _gguf_case(c, "gguf-offset-past-end", gguf_bytes(kvs, tensors, offsets=[*_offs(tensors)[:-1], 2**62]),
               words=("past the end",))
    _gguf_case(c, "gguf-overlap", gguf_bytes(kvs, tensors, offsets=[0] * len(tensors)), words=("overlaps",))
    _gguf_case(c, "gguf-truncated-data", good[: len(good) - 5000], words=("past the end",))
    _gguf_case(c, "gguf-missing-tensor", gguf_bytes(kvs, [t for t in tensors if t[0] != "blk.1.ffn_up.weight"]),
               expect="WeightError", words=("missing", "model.layers.1.mlp.up_proj.weight"))
    _gguf_case(c, "gguf-foreign-tensor", gguf_bytes(kvs, [*tensors, ("evil.weight", [4], 0, b"\0" * 16)]),
               words=("not part of a Llama model", "evil.weight"))
    nan_data = bytearray(tensors[i8][3])
    nan_data[40:44] = struct.pack("<f", float("nan"))
    _gguf_case(c, "gguf-nan-weight", gguf_bytes(kvs, tensor_edit(i8, data=bytes(nan_data))),
               expect="NumericalError", words=("model.layers.0.mlp.up_proj.weight",))
    q8 = np.zeros((128 * 64 // 32,), dtype=[("d", "<f2"), ("qs", "i1", 32)])
    q8["d"] = 0.01
    q8["qs"] = 3
    q8["d"][5] = np.inf
    _gguf_case(c, "gguf-q8-inf-scale", gguf_bytes(kvs, tensor_edit(i8, ttype=8, data=q8.tobytes())),
               expect="NumericalError", words=("model.layers.0.mlp.up_proj.weight",))
    _gguf_case(c, "gguf-q8-inf-scale-kept", gguf_bytes(kvs, tensor_edit(i8, ttype=8, data=q8.tobytes())),
               action="blocks", expect="NumericalError", words=("block field d",))
    bad_freqs = np.full(4, np.nan, np.float32).tobytes()
    _gguf_case(c, "gguf-rope-freqs-nan", gguf_bytes(kvs, [*tensors, ("rope_freqs.weight", [4], 0, bad_freqs)]),
               expect="CheckpointError", words=("rope_freqs.weight",))
    no_vocab = [t for t in tensors if t[0] != "token_embd.weight"]
    _gguf_case(c, "gguf-no-vocab", gguf_bytes(_with(kvs, "llama.vocab_size"), no_vocab), words=("vocabulary",))
    # embedded tokenizers
    vocab = spm_vocab_kvs()
    _gguf_case(c, "gguf-tokenizer-valid", gguf_bytes([*kvs, *vocab], tensors), expect="ok")
    C, T = "CheckpointError", "TokenizerError"  # wrong metadata types are refused by the GGUF reader itself
    n = len(vocab[1][2][1])
    for i, (key, vtype, value, err) in enumerate([
        ("tokenizer.ggml.tokens", ARR, (U32, list(range(64))), C),
        ("tokenizer.ggml.tokens", STR, "abc", C),
        ("tokenizer.ggml.token_type", ARR, (F32, [1.0] * n), C),
        ("tokenizer.ggml.token_type", ARR, (I32, [1] * 10), T),
        ("tokenizer.ggml.token_type", ARR, (I32, [9] * n), T),  # 9 is no token type
        ("tokenizer.ggml.scores", ARR, (STR, ["x"] * n), C),
        ("tokenizer.ggml.scores", ARR, (F32, [0.0] * 3), T),
        ("tokenizer.ggml.model", STR, "t5", T),
        ("tokenizer.ggml.model", U32, 1, C),
        ("tokenizer.ggml.bos_token_id", STR, "1", C),
        ("tokenizer.ggml.bos_token_id", U32, 10**6, "ConfigError"),
        ("tokenizer.ggml.unknown_token_id", I32, -5, T),
        ("tokenizer.ggml.add_bos_token", STR, "false", C),
        ("tokenizer.chat_template", U32, 5, C),
    ]):
        _gguf_case(c, f"gguf-tokenizer-{i}", gguf_bytes(_with([*kvs, *vocab], key, vtype, value), tensors),
                   expect=err, words=(key,))
    bpe = [("tokenizer.ggml.model", STR, "gpt2"), ("tokenizer.ggml.tokens", ARR, (STR, [chr(97 + i % 26) * (1 + i // 26)
                                                                                      for i in range(60)])),
           ("tokenizer.ggml.merges", ARR, (STR, ["a a"]))]
    _gguf_case(c, "gguf-bpe-valid", gguf_bytes([*kvs, *bpe], tensors), expect="ok")
    nested_merges = gstr("tokenizer.ggml.merges") + struct.pack("<IIQ", ARR, ARR, 1) + struct.pack("<IQ", STR, 1) + \
        gstr("a a")
    raw = b"".join(gstr(k) + struct.pack("<I", t) + gval(t, v) for k, t, v in [*kvs, *bpe[:2]]) + nested_merges
    _gguf_case(c, "gguf-bpe-merges-nested", gguf_bytes([None] * (len(kvs) + 3), tensors, raw_kv=raw),
               words=("nests",))
    _gguf_case(c, "gguf-bpe-merges-ints", gguf_bytes(_with([*kvs, *bpe], "tokenizer.ggml.merges", ARR, (U32, [1])),
                                                     tensors), words=("tokenizer.ggml.merges",))
    _gguf_case(c, "gguf-bpe-merge-no-space", gguf_bytes(_with([*kvs, *bpe], "tokenizer.ggml.merges", ARR,
                                                              (STR, ["aa"])), tensors),
               expect="TokenizerError", words=("merge",))
    _gguf_case(c, "gguf-bpe-pre-unknown", gguf_bytes([*kvs, *bpe, ("tokenizer.ggml.pre", STR, "evil")], tensors),
               expect="TokenizerError", words=("tokenizer.ggml.pre",))
    big_vocab = _with([*kvs, *vocab], "tokenizer.ggml.tokens", ARR, (STR, [f"t{i}" for i in range(100)]))
    big_vocab = _with(big_vocab, "tokenizer.ggml.scores")
    big_vocab = _with(big_vocab, "tokenizer.ggml.token_type")
    _gguf_case(c, "gguf-tokenizer-larger-than-embedding", gguf_bytes(_with(big_vocab, "llama.vocab_size", U32, 64),
                                                                     tensors),
               expect="TokenizerError", words=("embedding",))
    _gguf_case(c, "gguf-inspect-dim-max", gguf_bytes(kvs, tensor_edit(0, dims=[2**64 - 1, 64])), action="inspect",
               words=("more elements",))


def _offs(tensors: list) -> list[int]:
    out, pos = [], 0
    for _, _, _, data in tensors:
        out.append(pos)
        pos += -(-len(data) // 32) * 32
    return out


def _tokenizers(c: Corpus, outside: Path) -> None:
    E = "TokenizerError"

    def tok(name: str, files: dict[str, Any], *, expect: str = E, words: tuple = (), action: str = "load") -> None:
        d = c.folder(name)
        for fname, content in files.items():
            p = d / fname
            p.parent.mkdir(exist_ok=True)
            if isinstance(content, bytes):
                p.write_bytes(content)
            else:
                p.write_text(content if isinstance(content, str) else json.dumps(content))
        c.add(name, action, d, expect=expect, words=words)

    spec = tiny_tokenizer_json()
    tok("tok-valid", {"tokenizer.json": spec}, expect="ok")
    tok("tok-not-json", {"tokenizer.json": "{"}, words=("not valid JSON",))
    tok("tok-array", {"tokenizer.json": "[]"}, words=("JSON object",))
    tok("tok-duplicate", {"tokenizer.json": '{"model": {}, "model": {}}'}, words=("repeats the key",))
    tok("tok-invalid-spec", {"tokenizer.json": {"model": {"type": "Evil"}}}, words=("tokenizer.json",))
    sparse = json.loads(json.dumps(spec))
    sparse["model"]["vocab"]["zz"] = 4_000_000_000
    tok("tok-sparse-ids", {"tokenizer.json": sparse}, words=("tokenizer.json",))
    sparse2 = json.loads(json.dumps(spec))
    sparse2["model"]["vocab"]["zz"] = 3_000_000
    tok("tok-sparse-ids-2", {"tokenizer.json": sparse2}, words=("dense",))
    big = tiny_tokenizer_json(70)
    tok("tok-larger-than-embedding", {"tokenizer.json": big}, words=("embedding",))
    tok("tok-config-bos-unknown", {"tokenizer.json": spec, "tokenizer_config.json": {"bos_token": "<nope>"}},
        words=("not in the vocabulary",))
    tok("tok-config-array", {"tokenizer.json": spec, "tokenizer_config.json": [1]}, words=("JSON object",))
    tok("tok-config-template-list", {"tokenizer.json": spec, "tokenizer_config.json": {
        "chat_template": [{"name": ["x"], "template": "a"}, 5]}}, expect="ok")
    tok("tok-template-jinja-bad-utf8", {"tokenizer.json": spec, "chat_template.jinja": b"\xff\xfe"},
        words=("UTF-8",))
    tok("tok-template-jinja-huge", {"tokenizer.json": spec, "chat_template.jinja": "x" * (2 << 20)},
        words=("larger than",))
    tok("tok-model-garbage", {"tokenizer.model": b"\x0a\xff\xff\xff\xff\x0f"}, words=("tokenizer.model",))
    tok("tok-model-empty", {"tokenizer.model": b""}, words=("tokenizer.model",))
    tok("tok-tiktoken-long-token", {"tokenizer.model": b"YQ== 0\n" + __import__("base64").b64encode(b"a" * 5000)
                                    + b" 1\n"}, words=("line 2",))
    tok("tok-tiktoken-bad-rank", {"tokenizer.model": b"YQ== 0\nYg== " + b"9" * 5000 + b"\n"}, words=("line 2",))
    tok("tok-tiktoken-duplicate", {"tokenizer.model": b"YQ== 0\nYQ== 1\n"}, words=("repeats",))
    tok("tok-tiktoken-ranks", {"tokenizer.model": b"YQ== 0\nYg== 5\n"}, words=("ranks",))
    d = c.out / "tok-params-symlink"
    (d / "original").mkdir(parents=True)
    (d / "original" / "tokenizer.model").write_bytes(b"YQ== 0\n")
    os.symlink(outside / "passwd", d / "original" / "params.json")
    c.add("tok-params-symlink", "tokenizer", d, expect=E, words=("symlink",), forbid=("root:x",))


def _templates(c: Corpus) -> None:
    E = "InputError"
    for name, template, words in [
        ("nested-loops", "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
         ("more text",)),
        ("nested-list-loops", "{% set l = range(99999)|list %}{% for a in l %}{% for b in l %}{% endfor %}"
         "{% endfor %}", ("more text",)),
        ("string-times", "{{ 'x' * 10**10 }}", ("more text",)),
        ("list-times", "{{ ([1] * 10**9)|length }}", ("more text",)),
        ("power", "{{ 2 ** (10**9) }}", ("power",)),
        ("doubling", "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
         "{% endfor %}{{ ns.s|length }}", ("more text",)),
        ("macro-literal", "{% macro m() %}{% for i in range(99999) %}" + "A" * 10000 +
         "{% endfor %}{% endmacro %}{{ m() }}", ("more text",)),
        ("recursion", "{% macro m(n) %}{{ m(n+1) }}{% endmacro %}{{ m(0) }}", ("RecursionError",)),
        ("center", "{{ 'x'|center(10**10) }}", ("more text",)),
        ("ljust", "{{ 'x'.ljust(10**10) }}", ("more text",)),
        ("percent-format", "{{ '%10000000000s'|format(1) }}", ("more text",)),
        ("str-format", "{{ '{:>10000000000}'.format(1) }}", ("more text",)),
        ("replace", "{% set a = 'x' * 100000 %}{{ a|replace('x', 'y' * 100000) }}", ("more text",)),
        ("join", "{{ range(99999)|join('x' * 10000) }}", ("more text",)),
        ("indent", "{{ 'a\nb'|indent(10**9) }}", ("more text",)),
        ("tojson-indent", "{{ messages|tojson(indent=10**9) }}", ("indent",)),
        ("expandtabs", "{{ ('\t' * 1000).expandtabs(10**7) }}", ("more text",)),
        ("raise", "{{ raise_exception('no system role') }}", ("no system role",)),
        ("sandbox-class", "{{ ''.__class__.__mro__[1].__subclasses__() }}", ("sandbox",)),
        ("syntax", "{% for %}", ("chat template error",)),
        ("too-large", "x" * (2 << 20), ("at most",)),
        ("not-a-string", 5, ("not a string",)),
        ("data-error", "{{ messages[0]['content'] + 5 }}", ("failed",)),
    ]:
        c.add(f"template-{name}", "chat", None, expect=E, words=words, args={"template": template})
    c.add("template-ok", "chat", None, expect="ok",
          args={"template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"},
          check="result == '<user>hi'")


def _api(c: Corpus) -> None:
    tiny = str(TINY)
    E = "InputError"
    for i, n in enumerate([-1, 2.5, "3", True, None]):
        c.add(f"api-generate-ids-max-new-{i}", "generate_ids", tiny, expect=E, words=("max_new_tokens",),
              args={"ids": [1, 2, 3], "max_new_tokens": n})
    c.add("api-generate-ids-huge", "generate_ids", tiny, expect="ok", args={"ids": [1, 2, 3], "max_new_tokens": 10**15,
                                                                            "stop_at_eos": False},
          check="len(result) == 125")
    for i, ids in enumerate([[1.5, 2], [-1], [64], [[1, 2], [3]], [], [2**70], ["a"], [True, False]]):
        c.add(f"api-ids-{i}", "generate_ids", tiny, expect=E, words=("token",), args={"ids": ids, "max_new_tokens": 2})
        c.add(f"api-logits-ids-{i}", "logits", tiny, expect=E, words=("token",), args={"ids": ids})
    c.add("api-prompt-at-context", "generate_ids", tiny, expect=E, words=("context",),
          args={"ids": [1] * 128, "max_new_tokens": 1})
    for i, (field, value) in enumerate([("seed", "x"), ("seed", 1.5), ("seed", -1), ("top_k", 2.5),
                                        ("temperature", "hot"), ("temperature", float("nan")), ("temperature", -1),
                                        ("temperature", float("inf")), ("top_p", 0), ("top_p", 2), ("min_p", 2),
                                        ("repetition_penalty", 0), ("logprobs", -3), ("logprobs", 1.5), ("stop", 5),
                                        ("stop", ["a", 3]), ("stop_token_ids", [1.5]), ("max_new_tokens", -1),
                                        ("echo", "yes"), ("token_ids", [1.5, 2]), ("prompt", 5),
                                        ("messages", [{"content": "x"}]), ("add_generation_prompt", 1)]):
        c.add(f"api-request-{i}-{field}", "request", None, expect=E, words=(field,), args={field: value})
    c.add("api-request-stop-string", "request", None, expect="ok", args={"stop": "ab", "token_ids": [1]},
          check="result.stop == ['ab']")
    c.add("api-denormal-temperature", "generate", tiny, expect=E, words=("temperature",),
          args={"token_ids": [1, 2, 3], "temperature": 1e-310, "max_new_tokens": 2, "seed": 0})
    c.add("api-cache-huge", "new_cache", tiny, expect="AllocationError", words=("KV cache",),
          args={"max_len": 10**12})
    c.add("api-cache-zero", "new_cache", tiny, expect=E, words=("max_len",), args={"max_len": 0})
    c.add("api-cache-limit", "new_cache", tiny, expect="AllocationError", words=("memory limit",),
          args={"max_len": 10**6, "memory_limit": "10MB"})
    for i, value in enumerate(["inf", "-1GB", "nan", True, "1e30GB", "12 parsecs", "9" * 100]):
        c.add(f"api-parse-bytes-{i}", "parse_bytes", None, expect=E, words=("not a size",), args={"value": value})
    for i, (field, value) in enumerate([("context_length", -1), ("batch_size", 0), ("memory_limit", -5),
                                        ("backend", ["numpy"]), ("quantization_support", "no")]):
        c.add(f"api-backend-config-{i}", "backend_config", None, expect="BackendError" if field == "backend" else E,
              words=(field if field != "backend" else "backend",), args={field: value})
    c.add("api-inspect-context", "inspect", tiny, expect=E, words=("context_length",), args={"context_length": -1})
    c.add("api-inspect-memory-inf", "inspect", tiny, expect=E, words=("not a size",), args={"memory_limit": "inf"})
    for i, (field, value) in enumerate([("verify", "yes"), ("dequantize", 1), ("quant_semantics", "evil"),
                                        ("batch_size", 0), ("allow_symlinks", None)]):
        c.add(f"api-load-{i}-{field}", "load", tiny, expect=E, words=(field,), args={field: value})
    c.add("api-load-path-int", "load_path", None, expect=E, words=("path",), args={"path": 5})
    c.add("api-nan-logits", "generate_ids_unverified", str(c.out / "st-nonfinite-0"), expect="NumericalError",
          words=("layers.0",), args={"ids": [1, 2, 3], "max_new_tokens": 2})
    c.add("api-nan-logits-call", "logits_unverified", str(c.out / "st-nonfinite-0"), expect="NumericalError",
          words=("layers.0",), args={"ids": [1, 2, 3]})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    cases = build(Path(sys.argv[1]))
    print(f"wrote {len(cases)} cases to {sys.argv[1]}")
