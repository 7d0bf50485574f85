"""Tokenizers: text <-> token ids for Llama-family models, one interface over four sources.

* `tokenizer.json` (a Hugging Face fast tokenizer), run by the `tokenizers` library;
* `tokenizer.model` as a sentencepiece protobuf (Llama 1/2, TinyLlama), run by `sentencepiece`;
* `tokenizer.model` as Meta's tiktoken rank file (original Llama 3 checkpoints), rebuilt as a byte-level BPE
  for `tokenizers`;
* a GGUF file's embedded vocabulary (`tokenizer.ggml.*`), rebuilt as one of the two above so that the
  libraries, not code here, do the segmentation.

Conventions shared by every source (the reasons are in the comments at each place):

* `encode` parses special-token text (e.g. "<|eot_id|>", "<s>") into its id, as HF tokenizers and llama.cpp
  do for chat prompts; `parse_special=False` encodes it as plain text.
* BOS/EOS are added by `encode` itself, per `add_bos_token`/`add_eos_token`, never by a library's
  post-processor, and never doubled: text that already starts with the BOS token gets no second one.
* SentencePiece's dummy prefix: every piece of text between special tokens gets one leading "▁"
  (HF's legacy Llama behaviour and llama.cpp's), and `decode` strips exactly that one space from the
  start of each such run, so `decode(encode(x)) == x` byte for byte, for any x without a literal "▁".
* `decode` applies no "clean up tokenization spaces" step (it is lossy: " ." -> ".").
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import sentencepiece
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from refllama.errors import InputError, TokenizerError, brief
from refllama.formats import spm_proto
from refllama.formats.files import ModelFolder, open_regular, parse_json, read_bytes
from refllama.formats.gguf import GGUFFile, GGUFStrings
from refllama.formats.spm_proto import PieceType


class TokenizerType(enum.Enum):
    """The tokenizer family: what algorithm and conventions the vocabulary was made for."""

    SentencePiece = "SentencePiece"  # score-ordered BPE over characters with byte fallback and "▁" for spaces
    BPE = "BPE"  # byte-level BPE with ranked merges (GPT-2 style; Llama 3)
    Tiktoken = "Tiktoken"  # Meta's Llama 3 rank file: byte-level BPE whose merge order is the token rank
    Custom = "Custom"  # any other tokenizer.json (WordPiece, Unigram, ...): run as the file says


# Llama 3's pre-tokenizer regex (tokenizer.json, tiktoken, llama.cpp's "llama-bpe").
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Meta's special tokens, appended after the 128,000 ranks of the tiktoken file, in this order
# (meta-llama/llama3 `llama/tokenizer.py`; ids 128000..128255).
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)),
)
# Llama 3.1 and later (meta-llama/llama-models `llama3_1/api/tokenizer.py`): same ids for BOS/EOS, headers
# and eot; 128004, 128005, 128008 and 128010 are named, and the reserved tokens are renumbered.
LLAMA31_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    *(f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 11)),
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies ("Ġ" is the space)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_ENCODER = bytes_to_unicode()


def byte_level_text(token: bytes) -> str:
    """A token's bytes as they appear in a byte-level BPE vocabulary."""
    return "".join(_BYTE_ENCODER[b] for b in token)


# ---------------------------------------------------------------------------------------------------------
# codecs: what a library does for a piece of text, without BOS/EOS


class _Codec(Protocol):
    backend: Any

    def encode(self, text: str, parse_special: bool) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class _SentencePieceCodec:
    """sentencepiece for ordinary text; special-token text is split out here, since sentencepiece itself
    never matches control tokens in text."""

    def __init__(self, processor: sentencepiece.SentencePieceProcessor, special: Mapping[str, int]):
        self.backend = processor
        self._special = dict(special)
        # longest first, so "<|a|>x" never loses to a shorter special token that is its prefix
        alternatives = sorted(self._special, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def encode(self, text: str, parse_special: bool) -> list[int]:
        if not parse_special or self._pattern is None:
            return self.backend.encode(text)
        ids: list[int] = []
        pos = 0
        for match in self._pattern.finditer(text):
            # each run of text is encoded on its own, so it gets its own dummy-prefix "▁" (llama.cpp and HF legacy)
            ids += self.backend.encode(text[pos:match.start()])
            ids.append(self._special[match.group()])
            pos = match.end()
        return ids + self.backend.encode(text[pos:])

    def decode(self, ids: list[int]) -> str:
        # sentencepiece drops the one leading space its dummy prefix added, and joins byte-fallback pieces
        # (<0xE2><0x96>...) into UTF-8 before decoding; invalid bytes come out as U+FFFD.
        return self.backend.decode(ids)


class _TokenizersCodec:
    """A `tokenizers.Tokenizer`; it splits out its own added tokens."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self.backend = tokenizer
        self._literal: tokenizers.Tokenizer | None = None

    def encode(self, text: str, parse_special: bool) -> list[int]:
        tokenizer = self.backend if parse_special else self._literal_tokenizer()
        return tokenizer.encode(text, add_special_tokens=False).ids

    def _literal_tokenizer(self) -> tokenizers.Tokenizer:
        """A copy that encodes special-token text as plain text (the flag is shared state, so not on the original)."""
        if self._literal is None:
            self._literal = tokenizers.Tokenizer.from_str(self.backend.to_str())
            self._literal.encode_special_tokens = True
        return self._literal

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)


class _LazyCodec:
    """A codec built on first use. A GGUF's tokenizer is checked at load but built by the library only when asked
    for: SmolLM2's (49152 tokens, 48900 merges) holds ~15 MiB, which an engine handed token ids never needs."""

    def __init__(self, build: Callable[[], _Codec]):
        self._build: Callable[[], _Codec] | None = build
        self._codec: _Codec | None = None

    def _built(self) -> _Codec:
        if self._codec is None:
            self._codec, self._build = self._build(), None
        return self._codec

    @property
    def backend(self) -> Any:
        return self._built().backend

    def encode(self, text: str, parse_special: bool) -> list[int]:
        return self._built().encode(text, parse_special)

    def decode(self, ids: list[int]) -> str:
        return self._built().decode(ids)


# ---------------------------------------------------------------------------------------------------------
# the tokenizer


class LlamaTokenizer:
    """Text <-> token ids. Build with `from_dir`, `from_gguf_metadata` or `load_tokenizer`."""

    def __init__(self, *, codec: _Codec, type: TokenizerType, source: str, pieces: Sequence[str],
                 special_ids: Iterable[int], control_ids: Iterable[int], bos_token_id: int | None,
                 eos_token_id: int | None, pad_token_id: int | None, add_bos_token: bool, add_eos_token: bool,
                 chat_template: str | None, path: str | Path | None = None):
        self._codec = codec
        self.type = type
        self.source = source
        self.path = str(path) if path is not None else None
        self._pieces = pieces if isinstance(pieces, (_TokenizerPieces, GGUFStrings)) else list(pieces)
        self.vocab_size = len(self._pieces)
        self._piece_ids: dict[str, int] | None = None
        # Decoded as their own text, never through the library: control, unknown and user-defined tokens
        # (HF: every added token). Control (HF: special) ones are what skip_special_tokens drops.
        self._special_ids = frozenset(int(i) for i in special_ids)
        self._control_ids = frozenset(int(i) for i in control_ids)
        for name, value in (("bos", bos_token_id), ("eos", eos_token_id), ("pad", pad_token_id)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise TokenizerError(f"{name}_token_id {value} is outside the vocabulary of {self.vocab_size}",
                                     self.path)
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        for name, add, value in (("bos", add_bos_token, bos_token_id), ("eos", add_eos_token, eos_token_id)):
            if add and value is None:
                raise TokenizerError(f"add_{name}_token is true but there is no {name} token", self.path)
        self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
        self.chat_template = chat_template

    def __repr__(self) -> str:
        return (f"LlamaTokenizer(type={self.type.name}, source={self.source!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_token_id}, eos={self.eos_token_id}, add_bos={self.add_bos_token})")

    # -- token text --------------------------------------------------------------------------------------

    @property
    def bos_token(self) -> str | None:
        return self._pieces[self.bos_token_id] if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self._pieces[self.eos_token_id] if self.eos_token_id is not None else None

    @property
    def pad_token(self) -> str | None:
        return self._pieces[self.pad_token_id] if self.pad_token_id is not None else None

    @property
    def backend(self) -> Any:
        """The library object doing the work: a `sentencepiece.SentencePieceProcessor` or `tokenizers.Tokenizer`."""
        return self._codec.backend

    def id_to_piece(self, token_id: int) -> str:
        """The token as the vocabulary spells it ("▁Hello", "ĠHello", "<0x0A>", "<|eot_id|>")."""
        return self._pieces[self._check_id(token_id)]

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry spelled as `id_to_piece` spells it, or None."""
        if self._piece_ids is None:
            self._piece_ids = {p: i for i, p in reversed(list(enumerate(self._pieces)))}
        return self._piece_ids.get(piece)

    def is_special(self, token_id: int) -> bool:
        """True for control tokens (BOS, EOS, chat markers): the ones `skip_special_tokens` drops."""
        return int(token_id) in self._control_ids

    # -- encode / decode ---------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, *, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS/EOS per add_bos_token/add_eos_token (never doubled)."""
        if not isinstance(text, str):
            raise InputError(f"encode() takes a str, not {type(text).__name__}")
        ids = self._codec.encode(text, parse_special)
        if add_special_tokens:
            if self.add_bos_token and ids[:1] != [self.bos_token_id]:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token and ids[-1:] != [self.eos_token_id]:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`. Special tokens appear as their text unless skip_special_tokens drops them."""
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token_id = self._check_id(token_id)
            if token_id not in self._special_ids:
                run.append(token_id)
                continue
            # Text between special tokens is decoded run by run: a run is what one encode call of the
            # library produced, so its dummy-prefix space (SentencePiece) is stripped exactly once.
            if run:
                parts.append(self._codec.decode(run))
                run = []
            if not (skip_special_tokens and token_id in self._control_ids):
                parts.append(self._pieces[token_id])
        if run:
            parts.append(self._codec.decode(run))
        return "".join(parts)

    def _check_id(self, token_id: Any) -> int:
        if isinstance(token_id, (bool, np.bool_)) or not isinstance(token_id, (int, np.integer)):
            raise InputError(f"token ids must be ints, got {type(token_id).__name__}")
        if not 0 <= token_id < self.vocab_size:
            raise InputError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return int(token_id)

    # -- constructors ------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, folder: str | Path, *, llama3_special_tokens: Sequence[str] | None = None,
                 allow_symlinks: bool = False) -> LlamaTokenizer:
        """From a model folder: tokenizer.json (preferred, as transformers does), else tokenizer.model
        (sentencepiece protobuf or tiktoken ranks), else original/tokenizer.model (Meta's layout on the Hub).
        tokenizer_config.json, when present, gives the special tokens, add_bos/eos and the chat template.

        `llama3_special_tokens` overrides the special tokens appended to a tiktoken rank file (by default
        LLAMA31_SPECIAL_TOKENS if the folder's params.json has `use_scaled_rope`, else LLAMA3_SPECIAL_TOKENS).
        Files are reached as `refllama.formats.files.ModelFolder` allows (never outside the folder).
        """
        if not Path(folder).is_dir():
            raise TokenizerError("not a folder", folder)
        mf = ModelFolder(folder, allow_symlinks=allow_symlinks)
        config = _read_tokenizer_config(mf)
        path = mf.file("tokenizer.json", TokenizerError)
        if path is not None:
            return _from_tokenizer_json(path, config)
        for name in ("tokenizer.model", "original/tokenizer.model"):
            path = mf.file(name, TokenizerError)
            if path is not None:
                return _from_tokenizer_model(path, config, llama3_special_tokens, mf)
        raise TokenizerError("no tokenizer.json or tokenizer.model in the folder", folder)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str | Path | None = None) -> LlamaTokenizer:
        """From a GGUF file's metadata (`GGUFFile(path).metadata`); `source` names the file in errors."""
        model = metadata.get("tokenizer.ggml.model")
        if model is None:
            raise TokenizerError("GGUF metadata has no tokenizer.ggml.model (no embedded vocabulary)", source)
        if model == "llama":
            return _from_gguf_spm(metadata, source)
        if model == "gpt2":
            return _from_gguf_bpe(metadata, source)
        raise TokenizerError(f"unsupported tokenizer.ggml.model {brief(model)} (supported: 'llama', 'gpt2')", source)


def load_tokenizer(path: str | Path) -> LlamaTokenizer:
    """The tokenizer of a model folder or a .gguf file."""
    path = Path(path)
    if path.is_dir():
        return LlamaTokenizer.from_dir(path)
    if not path.exists():
        raise TokenizerError("no such file or folder", path)
    with open_regular(path, TokenizerError) as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise TokenizerError("not a model folder or a GGUF file", path)
    return LlamaTokenizer.from_gguf_metadata(GGUFFile(path).metadata, source=path)


# ---------------------------------------------------------------------------------------------------------
# model folders


MAX_TOKENIZER_BYTES = 256 << 20  # tokenizer.json of the largest vocabularies: ~35 MB; tokenizer.model: ~4 MB
MAX_TEMPLATE_BYTES = 1 << 20  # published chat templates: at most ~20 KB


def _read_json(path: Path, raw: bytes | None = None) -> Any:
    return parse_json(read_bytes(path, MAX_TOKENIZER_BYTES, TokenizerError) if raw is None else raw, path,
                      TokenizerError)


def _read_tokenizer_config(folder: ModelFolder) -> dict[str, Any]:
    """tokenizer_config.json, with special_tokens_map.json and chat_template.jinja/.json as fallbacks."""
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
        path = folder.file(name, TokenizerError)
        if path is not None:
            data = _read_json(path)
            if not isinstance(data, dict):
                raise TokenizerError("expected a JSON object", path)
            config.update(data)
    config["chat_template"] = _chat_template(config.get("chat_template"), folder)
    return config


def _chat_template(value: Any, folder: ModelFolder) -> str | None:
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value
                 if isinstance(t, dict) and isinstance(t.get("name"), str)}
        value = named.get("default", next(iter(named.values()), None))
    if isinstance(value, str):
        return value
    jinja = folder.file("chat_template.jinja", TokenizerError)
    if jinja is not None:  # transformers >= 4.43 saves it on its own
        raw = read_bytes(jinja, MAX_TEMPLATE_BYTES, TokenizerError)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"not valid UTF-8 (byte {e.start})", jinja) from None
    path = folder.file("chat_template.json", TokenizerError)
    if path is not None:
        template = _read_json(path)
        template = template.get("chat_template") if isinstance(template, dict) else None
        return template if isinstance(template, str) else None
    return None


def _token_text(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string or a serialized AddedToken {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    """A boolean setting of tokenizer_config.json; absent or null means the default."""
    value = config.get(key)
    return default if value is None else bool(value)


def _config_token_id(config: Mapping[str, Any], name: str, lookup, path: Path) -> tuple[bool, int | None]:
    """(named in the config?, its id) for bos_token/eos_token/pad_token."""
    text = _token_text(config.get(name))
    if text is None:
        return False, None
    token_id = lookup(text)
    if token_id is None:
        raise TokenizerError(f"{name} {text!r} of tokenizer_config.json is not in the vocabulary", path)
    return True, token_id


def _classify(spec: Mapping[str, Any]) -> TokenizerType:
    """The family of a tokenizer.json: byte-level BPE, SentencePiece-converted BPE ("▁", byte fallback), or other."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return TokenizerType.Custom
    pipeline = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")])
    if "ByteLevel" in pipeline:
        return TokenizerType.BPE
    if model.get("byte_fallback") or "Metaspace" in pipeline or "\u2581" in pipeline or "\\u2581" in pipeline:
        return TokenizerType.SentencePiece
    return TokenizerType.Custom


def _post_processor_specials(tokenizer: tokenizers.Tokenizer) -> tuple[list[int], list[int]]:
    """The ids tokenizer.json's post-processor puts before and after a text (e.g. Llama 3's BOS)."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def _added_token_ids(tokenizer: tokenizers.Tokenizer) -> tuple[list[int], list[int]]:
    """(every added token, the special ones)."""
    added = tokenizer.get_added_tokens_decoder()
    return list(added), [i for i, token in added.items() if token.special]


MAX_VOCAB = 1 << 22  # as LlamaConfig's limit on vocab_size


class _TokenizerPieces(Sequence[str]):
    """A `tokenizers.Tokenizer`'s vocabulary by id, read from the library on access: the library holds the strings
    already, and a Python copy of a 50k-150k vocabulary costs 8-25 MB of resident memory."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, size: int):
        self._tokenizer, self._size = tokenizer, size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._size))]
        i = range(self._size)[i]  # IndexError outside, negative ids from the end, as a list
        return self._tokenizer.id_to_token(i) or ""


def _pieces_of(tokenizer: tokenizers.Tokenizer, path: str | Path | None) -> _TokenizerPieces:
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = max(vocab.values(), default=-1) + 1
    if size > MAX_VOCAB or size > 4 * len(vocab) + 1024:  # ids are (nearly) dense in every real vocabulary
        raise TokenizerError(f"token ids run up to {size - 1} for {len(vocab)} tokens (at most {MAX_VOCAB}, and "
                             "nearly dense)", path)
    return _TokenizerPieces(tokenizer, size)


def _from_tokenizer_json(path: Path, config: Mapping[str, Any]) -> LlamaTokenizer:
    raw = read_bytes(path, MAX_TOKENIZER_BYTES, TokenizerError)
    spec = _read_json(path, raw)
    if not isinstance(spec, dict):
        raise TokenizerError("expected a JSON object", path)
    try:
        tokenizer = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # the Rust side raises plain Exception
        raise TokenizerError(f"not a valid tokenizer.json ({e})", path) from None
    lookup = tokenizer.token_to_id
    named_bos, bos = _config_token_id(config, "bos_token", lookup, path)
    named_eos, eos = _config_token_id(config, "eos_token", lookup, path)
    _, pad = _config_token_id(config, "pad_token", lookup, path)
    # Llama 3 folders: BOS comes from the post-processor and tokenizer_config has no add_bos_token.
    # Llama 2 folders: both say so. Either way we add it ourselves, once.
    before, after = _post_processor_specials(tokenizer)
    if not named_bos and len(before) == 1:
        bos = before[0]
    if not named_eos and len(after) == 1:
        eos = after[0]
    add_bos = _flag(config, "add_bos_token", bos is not None and bos in before)
    add_eos = _flag(config, "add_eos_token", eos is not None and eos in after)
    added, special = _added_token_ids(tokenizer)
    return LlamaTokenizer(
        codec=_TokenizersCodec(tokenizer), type=_classify(spec), source="tokenizer.json",
        pieces=_pieces_of(tokenizer, path), special_ids=added, control_ids=special, bos_token_id=bos,
        eos_token_id=eos, pad_token_id=pad, add_bos_token=add_bos, add_eos_token=add_eos,
        chat_template=config.get("chat_template"), path=path)


def _from_tokenizer_model(path: Path, config: Mapping[str, Any], llama3_special_tokens: Sequence[str] | None,
                          folder: ModelFolder) -> LlamaTokenizer:
    data = read_bytes(path, MAX_TOKENIZER_BYTES, TokenizerError)
    if _looks_like_tiktoken(data):
        specials = llama3_special_tokens
        if specials is None:
            params = "original/params.json" if path.parent.name == "original" else "params.json"
            specials = LLAMA31_SPECIAL_TOKENS if _uses_scaled_rope(folder, params) else LLAMA3_SPECIAL_TOKENS
        return _from_tiktoken(_read_tiktoken(data, path), specials, config, path)
    try:
        model = spm_proto.parse_model_proto(data)
    except spm_proto.ProtoError as e:
        raise TokenizerError(f"neither a sentencepiece model nor a tiktoken rank file ({e})", path) from None
    processor = _sentencepiece(data, path)
    lookup = _spm_lookup(model)
    named, bos = _config_token_id(config, "bos_token", lookup, path)
    if not named:
        bos = processor.bos_id() if processor.bos_id() >= 0 else None
    named, eos = _config_token_id(config, "eos_token", lookup, path)
    if not named:
        eos = processor.eos_id() if processor.eos_id() >= 0 else None
    named, pad = _config_token_id(config, "pad_token", lookup, path)
    if not named:
        pad = processor.pad_id() if processor.pad_id() >= 0 else None
    return _spm_tokenizer(
        processor, model, source="tokenizer.model", bos=bos, eos=eos, pad=pad,
        add_bos=_flag(config, "add_bos_token", True), add_eos=_flag(config, "add_eos_token", False),
        chat_template=config.get("chat_template"), path=path)


def _uses_scaled_rope(folder: ModelFolder, name: str) -> bool:
    """Meta's params.json has `use_scaled_rope` from Llama 3.1 on: those use the 3.1 special-token names."""
    params = folder.file(name, TokenizerError)
    if params is None:
        return False
    data = _read_json(params)
    return isinstance(data, dict) and bool(data.get("use_scaled_rope"))


# ---------------------------------------------------------------------------------------------------------
# sentencepiece


def _sentencepiece(proto: bytes, path: str | Path | None) -> sentencepiece.SentencePieceProcessor:
    try:
        return sentencepiece.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError, ValueError) as e:
        raise TokenizerError(f"sentencepiece cannot load the model ({e})", path) from None


def _spm_lookup(model: spm_proto.ModelProto):
    ids = {p.piece: i for i, p in reversed(list(enumerate(model.pieces)))}
    return ids.get


def _spm_tokenizer(processor: sentencepiece.SentencePieceProcessor, model: spm_proto.ModelProto, *, source: str,
                   bos: int | None, eos: int | None, pad: int | None, add_bos: bool, add_eos: bool,
                   chat_template: str | None, path: str | Path | None) -> LlamaTokenizer:
    special_types = (PieceType.CONTROL, PieceType.UNKNOWN, PieceType.USER_DEFINED)
    special = {p.piece: i for i, p in enumerate(model.pieces) if p.type in special_types and p.piece}
    control = [i for i, p in enumerate(model.pieces) if p.type in (PieceType.CONTROL, PieceType.UNKNOWN)]
    return LlamaTokenizer(
        codec=_SentencePieceCodec(processor, special), type=TokenizerType.SentencePiece, source=source,
        pieces=[p.piece for p in model.pieces], special_ids=special.values(), control_ids=control,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, add_bos_token=add_bos, add_eos_token=add_eos,
        chat_template=chat_template, path=path)


# ---------------------------------------------------------------------------------------------------------
# tiktoken rank files


_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+")


def _looks_like_tiktoken(data: bytes) -> bool:
    """Meta's Llama 3 tokenizer.model is text, "base64(token bytes) rank" per line; a protobuf is not."""
    first = data.split(b"\n", 1)[0].rstrip(b"\r")
    return _TIKTOKEN_LINE.fullmatch(first) is not None


MAX_TIKTOKEN_BYTES = 1024  # a token's length; building merges costs its square (Llama 3's longest: 128 bytes)


def _read_tiktoken(data: bytes, path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            token = base64.b64decode(token, validate=True)
            if len(rank) > 12 or len(token) > MAX_TIKTOKEN_BYTES:
                raise ValueError
            if token in ranks:
                raise TokenizerError(f"line {number} repeats a token", path)
            ranks[token] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"line {number} is not 'base64 rank' (a token of at most {MAX_TIKTOKEN_BYTES} "
                                 "bytes)", path) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError("ranks are not 0..n-1, each once", path)
    return ranks


def merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges that reproduce tiktoken: every split of a token into two tokens, ordered by the rank
    of the merged token (tiktoken merges the adjacent pair whose concatenation ranks lowest), ties by the
    ranks of the two halves."""
    keyed = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                keyed.append((rank, ranks[left], ranks[right], left, right))
    keyed.sort()
    return [(left, right) for *_, left, right in keyed]


def tiktoken_tokenizer(ranks: Mapping[bytes, int], special_tokens: Sequence[str]) -> tokenizers.Tokenizer:
    """Llama 3's tiktoken encoding as a `tokenizers.Tokenizer`; special tokens get ids len(ranks), ..."""
    vocab = {byte_level_text(token): rank for token, rank in ranks.items()}
    merges = [(byte_level_text(a), byte_level_text(b)) for a, b in merges_from_ranks(ranks)]
    # ignore_merges: a pre-token that is itself in the vocabulary is one token (tiktoken looks it up first)
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(LLAMA3_PATTERN, isolate_digits=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tokenizer


def _from_tiktoken(ranks: dict[bytes, int], special_tokens: Sequence[str], config: Mapping[str, Any],
                   path: Path) -> LlamaTokenizer:
    tokenizer = tiktoken_tokenizer(ranks, special_tokens)
    lookup = tokenizer.token_to_id
    # Meta's tokenizer: BOS <|begin_of_text|>, EOS <|end_of_text|>, no pad; BOS added, EOS not.
    named, bos = _config_token_id(config, "bos_token", lookup, path)
    bos = bos if named else lookup("<|begin_of_text|>")
    named, eos = _config_token_id(config, "eos_token", lookup, path)
    eos = eos if named else lookup("<|end_of_text|>")
    _, pad = _config_token_id(config, "pad_token", lookup, path)
    added, special = _added_token_ids(tokenizer)
    return LlamaTokenizer(
        codec=_TokenizersCodec(tokenizer), type=TokenizerType.Tiktoken, source="tiktoken",
        pieces=_pieces_of(tokenizer, path), special_ids=added, control_ids=special, bos_token_id=bos,
        eos_token_id=eos, pad_token_id=pad, add_bos_token=_flag(config, "add_bos_token", True),
        add_eos_token=_flag(config, "add_eos_token", False), chat_template=config.get("chat_template"),
        path=path)


# ---------------------------------------------------------------------------------------------------------
# GGUF-embedded vocabularies


def _byte_level_pre_tokenizer(pattern: str | None, isolate_digits: bool) -> pre_tokenizers.PreTokenizer:
    """Optional \\p{N} isolation, then `pattern` (None: GPT-2's own regex, built into ByteLevel), then bytes."""
    steps = []
    if isolate_digits:
        steps.append(pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"))
    if pattern is not None:
        steps.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pattern is None))
    return pre_tokenizers.Sequence(steps)


class _PreTokenizer(NamedTuple):
    pattern: str | None  # None: GPT-2's regex, built into ByteLevel
    isolate_digits: bool  # split every \p{N} character (digits, "½", ...) off first
    ignore_merges: bool  # a pre-token that is itself in the vocabulary is one token
    add_bos: bool  # the default of tokenizer.ggml.add_bos_token


# tokenizer.ggml.pre -> its pre-tokenizer, per llama.cpp's llama-vocab.cpp
_GGUF_PRE: dict[str, _PreTokenizer] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3"), _PreTokenizer(LLAMA3_PATTERN, False, True, True)),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PreTokenizer(LLAMA3_PATTERN, False, False, False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    _PreTokenizer(None, True, False, False)),
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "phi-2"), _PreTokenizer(None, False, False, False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _PreTokenizer(QWEN2_PATTERN, False, False, False)),
}


def _gguf_vocab(metadata: Mapping[str, Any], source: str | Path | None) -> tuple[Sequence[str], np.ndarray]:
    tokens = metadata.get("tokenizer.ggml.tokens")  # GGUFStrings (decoded on access) from a file
    if not (isinstance(tokens, GGUFStrings) or (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens))) \
            or not tokens:
        raise TokenizerError("tokenizer.ggml.tokens is missing or not a list of strings", source)
    if len(tokens) > MAX_VOCAB:
        raise TokenizerError(f"tokenizer.ggml.tokens has {len(tokens)} entries (at most {MAX_VOCAB})", source)
    types = metadata.get("tokenizer.ggml.token_type")
    types = np.ones(len(tokens), np.int32) if types is None else np.asarray(types)
    if types.dtype.kind not in "iu":
        raise TokenizerError("tokenizer.ggml.token_type is not an array of integers", source)
    if types.shape != (len(tokens),):
        raise TokenizerError(f"tokenizer.ggml.token_type has {types.size} entries for {len(tokens)} tokens",
                             source)
    types = np.where(types == 0, PieceType.NORMAL, types)  # 0: "undefined", read as normal as llama.cpp does
    bad = sorted(set(types.tolist()) - {int(t) for t in PieceType})
    if bad:
        raise TokenizerError(f"tokenizer.ggml.token_type has unknown values {bad}", source)
    return tokens, types


def _gguf_id(metadata: Mapping[str, Any], key: str, default: int | None, size: int,
             source: str | Path | None) -> int | None:
    value = metadata.get(f"tokenizer.ggml.{key}", default)
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TokenizerError(f"tokenizer.ggml.{key} is not an integer token id", source)
    if not 0 <= int(value) < size:
        raise TokenizerError(f"tokenizer.ggml.{key} {value} is outside the vocabulary of {size}", source)
    return int(value)


def sentencepiece_proto_from_gguf(metadata: Mapping[str, Any], source: str | Path | None = None) -> bytes:
    """A sentencepiece `tokenizer.model` (protobuf bytes) for a GGUF "llama" vocabulary."""
    return spm_proto.serialize_model_proto(_gguf_spm_model(metadata, source))


def _gguf_spm_model(metadata: Mapping[str, Any], source: str | Path | None) -> spm_proto.ModelProto:
    """The ModelProto with the conventions llama.cpp's SPM tokenizer assumes: BPE by score, byte fallback,
    spaces as "▁", a dummy prefix unless add_space_prefix is false, and no other normalization (no NFKC,
    no whitespace collapsing)."""
    tokens, types = _gguf_vocab(metadata, source)
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is not None and not (isinstance(scores, np.ndarray) and scores.dtype.kind in "fiu"):
        raise TokenizerError("tokenizer.ggml.scores is not an array of numbers", source)
    scores = np.zeros(len(tokens), np.float32) if scores is None else np.asarray(scores, np.float32)
    if scores.shape != (len(tokens),):
        raise TokenizerError(f"tokenizer.ggml.scores has {scores.size} entries for {len(tokens)} tokens", source)
    n = len(tokens)
    unk = _gguf_id(metadata, "unknown_token_id", 0, n, source)
    if not (types == PieceType.UNKNOWN).any():  # sentencepiece needs exactly one unknown piece
        types = types.copy()
        types[unk] = PieceType.UNKNOWN
    else:
        unk = int(np.flatnonzero(types == PieceType.UNKNOWN)[0])

    def control_id(key: str, default: int | None) -> int:
        token_id = _gguf_id(metadata, key, default, n, source)
        return token_id if token_id is not None and types[token_id] == PieceType.CONTROL else -1

    bos, eos, pad = control_id("bos_token_id", 1), control_id("eos_token_id", 2), control_id("padding_token_id", None)
    trainer = spm_proto.TrainerSpec(
        model_type=spm_proto.ModelType.BPE, vocab_size=n,
        byte_fallback=int((types == PieceType.BYTE).sum()) == 256,
        unk_id=unk, bos_id=bos, eos_id=eos, pad_id=pad,
        unk_piece=tokens[unk], bos_piece=tokens[bos] if bos >= 0 else "<s>",
        eos_piece=tokens[eos] if eos >= 0 else "</s>", pad_piece=tokens[pad] if pad >= 0 else "<pad>")
    normalizer = spm_proto.NormalizerSpec(
        name="identity", add_dummy_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", True)),
        remove_extra_whitespaces=bool(metadata.get("tokenizer.ggml.remove_extra_whitespaces", False)),
        escape_whitespaces=True)
    pieces = [spm_proto.Piece(t, float(s), PieceType(int(k))) for t, s, k in zip(tokens, scores, types, strict=True)]
    return spm_proto.ModelProto(pieces, trainer, normalizer)


def _from_gguf_spm(metadata: Mapping[str, Any], source: str | Path | None) -> LlamaTokenizer:
    model = _gguf_spm_model(metadata, source)
    n = len(model.pieces)
    return _spm_tokenizer(
        _sentencepiece(spm_proto.serialize_model_proto(model), source), model, source="gguf",
        bos=_gguf_id(metadata, "bos_token_id", 1, n, source), eos=_gguf_id(metadata, "eos_token_id", 2, n, source),
        pad=_gguf_id(metadata, "padding_token_id", None, n, source),
        add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=_gguf_template(metadata, source), path=source)


def _gguf_template(metadata: Mapping[str, Any], source: str | Path | None) -> str | None:
    template = metadata.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise TokenizerError("tokenizer.chat_template is not a string", source)
    return template


def _gguf_pre(metadata: Mapping[str, Any], source: str | Path | None) -> _PreTokenizer:
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in _GGUF_PRE:
        raise TokenizerError(f"unsupported tokenizer.ggml.pre {brief(pre)} (supported: "
                             f"{', '.join(sorted(_GGUF_PRE))})", source)
    return _GGUF_PRE[pre]


def _gguf_bpe_vocab(metadata: Mapping[str, Any], source: str | Path | None
                    ) -> tuple[Sequence[str], np.ndarray, dict[str, int]]:
    """(tokens, types, token -> id) of a GGUF "gpt2" vocabulary, its tokens checked unique and UTF-8, as the
    `tokenizers` BPE model needs them."""
    tokens, types = _gguf_vocab(metadata, source)
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        try:
            token.encode("utf-8")
        except UnicodeEncodeError:
            raise TokenizerError(f"tokenizer.ggml.tokens entry {i} is not valid UTF-8", source) from None
        vocab.setdefault(token, i)
    if len(vocab) != len(tokens):
        raise TokenizerError("tokenizer.ggml.tokens has duplicate entries", source)
    return tokens, types, vocab


def _gguf_merges(metadata: Mapping[str, Any], vocab: Mapping[str, int], source: str | Path | None
                 ) -> Iterator[tuple[str, str]]:
    """The merge pairs, each checked as the `tokenizers` BPE model checks it when it is built: its two tokens and
    their concatenation are in the vocabulary."""
    merges = metadata.get("tokenizer.ggml.merges")
    if not (isinstance(merges, GGUFStrings) or (isinstance(merges, list) and all(isinstance(m, str) for m in merges))):
        raise TokenizerError("tokenizer.ggml.merges is missing or not a list of strings (a 'gpt2' vocabulary "
                             "needs it)", source)
    for merge in merges:
        cut = merge.find(" ", 1)  # as llama.cpp: the first space after the first character
        if cut < 0:
            raise TokenizerError(f"merge {brief(merge)} is not two tokens separated by a space", source)
        left, right = merge[:cut], merge[cut + 1:]
        for token in (left, right, left + right):
            if token not in vocab:
                raise TokenizerError(f"merge {brief(merge)}: {brief(token)} is not in tokenizer.ggml.tokens", source)
        yield left, right


def hf_tokenizer_from_gguf(metadata: Mapping[str, Any], source: str | Path | None = None) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` for a GGUF "gpt2" (byte-level BPE) vocabulary, without a post-processor."""
    tokens, types, vocab = _gguf_bpe_vocab(metadata, source)
    pairs = list(_gguf_merges(metadata, vocab, source))
    pre = _gguf_pre(metadata, source)
    try:
        tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges))
    except Exception as e:  # the Rust side raises plain Exception
        raise TokenizerError(f"cannot build the BPE model ({e})", source) from None
    del vocab, pairs
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(pre.pattern, pre.isolate_digits)
    tokenizer.decoder = decoders.ByteLevel()
    # Control/unknown tokens are special (matched in text, dropped by skip_special_tokens); user-defined
    # ones are matched in text but are ordinary output. They are raw text, not byte-level strings.
    added, special = _gguf_added_ids(tokens, types)
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                          for i in sorted(set(added) - set(special))])
    return tokenizer


def _gguf_added_ids(tokens: Sequence[str], types: np.ndarray) -> tuple[list[int], list[int]]:
    """(every token the library adds, the special ones), as `_added_token_ids` would read them back from it: control,
    unknown and user-defined tokens, of which control and unknown are special; the library skips empty ones."""
    special_types = np.isin(types, (PieceType.CONTROL, PieceType.UNKNOWN))
    added_types = special_types | (types == PieceType.USER_DEFINED)
    added = [int(i) for i in np.flatnonzero(added_types) if tokens[i]]
    return added, [i for i in added if special_types[i]]


def _from_gguf_bpe(metadata: Mapping[str, Any], source: str | Path | None) -> LlamaTokenizer:
    # Every check of the data at load, the library's tokenizer built on first use (a bad vocabulary fails here)
    tokens, types, vocab = _gguf_bpe_vocab(metadata, source)
    for _ in _gguf_merges(metadata, vocab, source):
        pass
    del vocab
    pre = _gguf_pre(metadata, source)
    n = len(tokens)
    added, special = _gguf_added_ids(tokens, types)
    kept = {k: metadata[k] for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                                     "tokenizer.ggml.pre") if k in metadata}
    return LlamaTokenizer(
        codec=_LazyCodec(lambda: _TokenizersCodec(hf_tokenizer_from_gguf(kept, source))),
        type=TokenizerType.BPE, source="gguf", pieces=tokens, special_ids=added, control_ids=special,
        bos_token_id=_gguf_id(metadata, "bos_token_id", None, n, source),
        eos_token_id=_gguf_id(metadata, "eos_token_id", None, n, source),
        pad_token_id=_gguf_id(metadata, "padding_token_id", None, n, source),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", pre.add_bos)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=_gguf_template(metadata, source), path=source)
