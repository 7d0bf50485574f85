"""GGUF -> standard Hugging Face folder files, loadable by refllama and by transformers alike.

`gguf_to_hf` writes a whole model: weights under HF names with q/k rows back in HF order (quantized tensors
dequantized to float32, the exact values both engines compute with; F16/BF16/F32 kept), config.json,
generation_config.json and the tokenizer files. The vocabulary writers are also used on their own, to run
llama.cpp's tokenizer test vectors through every folder format refllama reads:

* a "llama" (SentencePiece) vocabulary -> `tokenizer.model` (sentencepiece protobuf) + tokenizer_config.json,
  or a Hugging Face `tokenizer.json` in the Llama 2 style (BPE with byte fallback, "▁" for spaces);
* a "gpt2" (byte-level BPE) vocabulary -> `tokenizer.json` + tokenizer_config.json, or, for Llama 3's,
  Meta's tiktoken rank file (`tokenizer.model`: one "base64(token bytes) rank" line per token).

    python -m refllama.formats.convert MODEL.gguf OUT_DIR                 # the whole model (= refllama convert)
    python -m refllama.formats.convert VOCAB.gguf OUT_DIR --vocab-only [--format FORMAT]  # FORMAT: see FORMATS
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from safetensors.numpy import save_file
from tokenizers import AddedToken, decoders, models, normalizers, processors

from refllama.errors import RefLlamaError, TokenizerError
from refllama.formats.checkpoint import load_weight_map
from refllama.formats.gguf import GGUFFile
from refllama.formats.gguf_llama import GGUFTensorSource, config_from_gguf
from refllama.formats.spm_proto import PieceType
from refllama.formats.tokenizer import LlamaTokenizer, bytes_to_unicode, sentencepiece_proto_from_gguf


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the model in `gguf_path` as an HF folder at `out_dir` (created; existing files are overwritten)."""
    gguf = GGUFFile(gguf_path)
    config = config_from_gguf(gguf)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = config.to_hf_dict()
    source = GGUFTensorSource(gguf, config)
    load_weight_map(source, config)  # every tensor present and of the right shape, before writing anything
    tensors = {name: np.ascontiguousarray(source.get(name)) for name in source.names()}
    dtypes = {str(t.dtype) for t in tensors.values() if t.ndim == 2}
    hf_config["torch_dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    weights = out / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    weights.chmod(0o666 & ~_umask())  # safetensors writes through a private temporary file (0600)
    _write_json(out / "config.json", hf_config)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": hf_config["eos_token_id"]}
    if config.pad_token_id is not None:
        generation["pad_token_id"] = config.pad_token_id
    _write_json(out / "generation_config.json", generation)
    vocabulary = gguf.metadata.get("tokenizer.ggml.model")
    if vocabulary == "llama":
        write_sentencepiece_model(gguf.metadata, out)  # tokenizer.model, for sentencepiece users
        write_sentencepiece_tokenizer_json(gguf.metadata, out)  # tokenizer.json, which loaders prefer
    elif vocabulary is not None:
        write_tokenizer_json(gguf.metadata, out)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_metadata(path: str | Path) -> dict[str, Any]:
    return GGUFFile(path).metadata


FORMATS = ("tokenizer.model", "tokenizer.json", "tiktoken")




def _token(metadata: Mapping[str, Any], key: str) -> str | None:
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    return None if token_id is None else metadata["tokenizer.ggml.tokens"][int(token_id)]


def _write_config(out_dir: Path, metadata: Mapping[str, Any], **extra: Any) -> None:
    """tokenizer_config.json: special tokens by text, the chat template, and whatever `extra` says."""
    config: dict[str, Any] = dict(extra)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        text = _token(metadata, key)
        if text is not None:
            config[name] = text
    if metadata.get("tokenizer.chat_template"):
        config["chat_template"] = metadata["tokenizer.chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")


def _require_model(metadata: Mapping[str, Any], model: str) -> None:
    found = metadata.get("tokenizer.ggml.model")
    if found != model:
        raise TokenizerError(f"this conversion needs a tokenizer.ggml.model {model!r} vocabulary, not {found!r}")


def write_sentencepiece_model(metadata: Mapping[str, Any], out_dir: str | Path) -> Path:
    """A "llama" vocabulary as a sentencepiece `tokenizer.model` + tokenizer_config.json (Llama 2 style)."""
    _require_model(metadata, "llama")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(sentencepiece_proto_from_gguf(metadata))
    _write_config(out_dir, metadata, add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
                  add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)))
    return out_dir


def _spm_merges(tokens: list[str], scores: np.ndarray, types: np.ndarray) -> list[tuple[str, str]]:
    """Merges for a score-ordered SentencePiece BPE, as transformers' SentencePieceExtractor makes them: every
    split of a normal piece into two vocabulary pieces, higher-scoring results first, ties by the halves' ids."""
    ids = {t: i for i, t in enumerate(tokens)}
    keyed = []
    for i, piece in enumerate(tokens):
        if types[i] != PieceType.NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                keyed.append((-float(scores[i]), ids[left], ids[right], left, right))
    keyed.sort()
    return [(left, right) for *_, left, right in keyed]


def sentencepiece_tokenizer_json(metadata: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """A "llama" vocabulary as HF's Llama 2 tokenizer.json has it: BPE with byte fallback, a normalizer
    that prepends "▁" and turns spaces into "▁", and a decoder that undoes both."""
    _require_model(metadata, "llama")
    tokens = metadata["tokenizer.ggml.tokens"]
    types = np.asarray(metadata["tokenizer.ggml.token_type"])
    scores = np.asarray(metadata["tokenizer.ggml.scores"], np.float32)
    unk = int(metadata.get("tokenizer.ggml.unknown_token_id", 0))
    model = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=_spm_merges(tokens, scores, types),
                       unk_token=tokens[unk], fuse_unk=True, byte_fallback=True)
    tokenizer = tokenizers.Tokenizer(model)
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", "\u2581")
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prefix else replace
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
    special = (types == PieceType.CONTROL) | (types == PieceType.UNKNOWN)
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i in np.flatnonzero(special)])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                          for i in np.flatnonzero(types == PieceType.USER_DEFINED)])
    return tokenizer


def write_sentencepiece_tokenizer_json(metadata: Mapping[str, Any], out_dir: str | Path) -> Path:
    """A "llama" vocabulary as a Llama 2 style tokenizer.json + tokenizer_config.json (add_bos_token set)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = sentencepiece_tokenizer_json(metadata)
    bos = _token(metadata, "bos_token_id")
    if bos is not None and metadata.get("tokenizer.ggml.add_bos_token", True):
        _add_bos_post_processor(tokenizer, bos, int(metadata["tokenizer.ggml.bos_token_id"]))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_config(out_dir, metadata, add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
                  add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)))
    return out_dir


def _add_bos_post_processor(tokenizer: tokenizers.Tokenizer, bos: str, bos_id: int) -> None:
    """The post-processor HF folders use to add BOS (refllama ignores it and adds BOS itself, once)."""
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])


def write_tokenizer_json(metadata: Mapping[str, Any], out_dir: str | Path) -> Path:
    """A "gpt2" vocabulary as tokenizer.json + tokenizer_config.json, the way Llama 3 folders have them:
    the BOS comes from the post-processor, and tokenizer_config.json has no add_bos_token."""
    _require_model(metadata, "gpt2")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = LlamaTokenizer.from_gguf_metadata(metadata)
    if tok.add_bos_token:
        _add_bos_post_processor(tok.backend, tok.bos_token, tok.bos_token_id)
    tok.backend.save(str(out_dir / "tokenizer.json"))
    _write_config(out_dir, metadata)
    return out_dir


def write_tiktoken(metadata: Mapping[str, Any], out_dir: str | Path) -> Path:
    """A Llama 3 "gpt2" vocabulary as Meta's tiktoken rank file: the ordinary tokens, whose ids are their
    ranks, as "base64(bytes) rank" lines. The special tokens are not in the file (Meta's loader appends them)."""
    _require_model(metadata, "gpt2")
    tokens = metadata["tokenizer.ggml.tokens"]
    types = np.asarray(metadata["tokenizer.ggml.token_type"])
    n_ranks = int(np.argmax(types != PieceType.NORMAL)) if (types != PieceType.NORMAL).any() else len(tokens)
    if (types[n_ranks:] == PieceType.NORMAL).any():
        raise TokenizerError("ordinary tokens after the special ones: not a tiktoken-style vocabulary")
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    lines = []
    for rank, token in enumerate(tokens[:n_ranks]):
        try:
            raw = bytes(byte_of[c] for c in token)
        except KeyError:
            raise TokenizerError(f"token {rank} {token!r} is not a byte-level BPE string") from None
        lines.append(f"{base64.b64encode(raw).decode('ascii')} {rank}\n")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_text("".join(lines), encoding="ascii")
    return out_dir


def convert_vocab(gguf_path: str | Path, out_dir: str | Path, fmt: str | None = None) -> Path:
    """Write the vocabulary in `fmt` (default: tokenizer.model for "llama", tokenizer.json for "gpt2")."""
    metadata = read_metadata(gguf_path)
    model = metadata.get("tokenizer.ggml.model")
    fmt = fmt or ("tokenizer.model" if model == "llama" else "tokenizer.json")
    if model == "llama":
        writers = {"tokenizer.model": write_sentencepiece_model, "tokenizer.json": write_sentencepiece_tokenizer_json}
    else:
        writers = {"tokenizer.json": write_tokenizer_json, "tiktoken": write_tiktoken}
    if fmt not in writers:
        raise TokenizerError(f"cannot write {fmt} for a tokenizer.ggml.model {model!r} vocabulary", gguf_path)
    return writers[fmt](metadata, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-only", action="store_true", help="write only the tokenizer files")
    parser.add_argument("--format", choices=FORMATS, default=None, help="tokenizer format (with --vocab-only)")
    args = parser.parse_args(argv)
    try:
        out = convert_vocab(args.gguf, args.out_dir, args.format) if args.vocab_only \
            else gguf_to_hf(args.gguf, args.out_dir)
    except RefLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
