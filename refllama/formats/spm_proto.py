"""sentencepiece's ModelProto (the protobuf `tokenizer.model`), read and written without the protobuf package.

Only the fields a Llama-family tokenizer needs are kept; every other field is skipped when reading and
left at its default when writing. Field numbers are those of sentencepiece's `sentencepiece_model.proto`:

    ModelProto:     1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
    SentencePiece:  1 piece (string), 2 score (float), 3 type (enum)
    TrainerSpec:    3 model_type (1 UNIGRAM, 2 BPE, 3 WORD, 4 CHAR), 4 vocab_size, 35 byte_fallback,
                    40 unk_id, 41 bos_id, 42 eos_id, 43 pad_id, 45..48 unk/bos/eos/pad piece
    NormalizerSpec: 1 name, 2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces,
                    5 escape_whitespaces

proto2 defaults matter: a field that is absent reads as its default (add_dummy_prefix true,
remove_extra_whitespaces true, bos_id 1, ...), so the writer always writes every field it knows.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

# Wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class PieceType(enum.IntEnum):
    """sentencepiece's SentencePiece.Type; GGUF's `tokenizer.ggml.token_type` uses the same numbers."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class ModelType(enum.IntEnum):
    UNIGRAM = 1
    BPE = 2
    WORD = 3
    CHAR = 4


@dataclass
class Piece:
    piece: str
    score: float = 0.0
    type: PieceType = PieceType.NORMAL


@dataclass
class TrainerSpec:
    model_type: ModelType = ModelType.UNIGRAM
    vocab_size: int = 8000
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    unk_piece: str = "<unk>"
    bos_piece: str = "<s>"
    eos_piece: str = "</s>"
    pad_piece: str = "<pad>"


@dataclass
class NormalizerSpec:
    name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


@dataclass
class ModelProto:
    pieces: list[Piece] = field(default_factory=list)
    trainer_spec: TrainerSpec = field(default_factory=TrainerSpec)
    normalizer_spec: NormalizerSpec = field(default_factory=NormalizerSpec)


class ProtoError(ValueError):
    """The bytes are not a well-formed ModelProto."""


# ---------------------------------------------------------------------------------------------------------
# wire format


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ProtoError(f"bad varint at offset {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def _fields(buf: bytes):
    """Yield (field number, wire type, value) for each field of one message; LEN values as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == _LEN:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ProtoError(f"field {number}: length {n} runs past the end")
            value, pos = buf[pos:pos + n], pos + n
        elif wire in (_I32, _I64):
            size = 4 if wire == _I32 else 8
            if pos + size > len(buf):
                raise ProtoError(f"field {number}: truncated fixed-size value")
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ProtoError(f"field {number}: unsupported wire type {wire}")
        yield number, wire, value


def _int32(value: int) -> int:
    """A varint as a signed int32 (negative ints are written as 64-bit two's complement)."""
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >= 1 << 63 else value


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int32 -> ten-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, _LEN) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _key(number, _VARINT) + _varint(int(value))


def _str_field(number: int, value: str) -> bytes:
    return _len_field(number, value.encode("utf-8", errors="surrogateescape"))


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="surrogateescape")


# ---------------------------------------------------------------------------------------------------------
# reading


def _parse_piece(buf: bytes) -> Piece:
    piece = Piece("")
    for number, wire, value in _fields(buf):
        if number == 1 and wire == _LEN:
            piece.piece = _text(value)
        elif number == 2 and wire == _I32:
            piece.score = struct.unpack("<f", value)[0]
        elif number == 3 and wire == _VARINT:
            try:
                piece.type = PieceType(value)
            except ValueError:
                raise ProtoError(f"piece {piece.piece!r} has unknown type {value}") from None
    return piece


_TRAINER_INTS = {4: "vocab_size", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
_TRAINER_STRS = {45: "unk_piece", 46: "bos_piece", 47: "eos_piece", 48: "pad_piece"}


def _parse_trainer(buf: bytes) -> TrainerSpec:
    spec = TrainerSpec()
    for number, wire, value in _fields(buf):
        if number == 3 and wire == _VARINT:
            try:
                spec.model_type = ModelType(value)
            except ValueError:
                raise ProtoError(f"unknown model_type {value}") from None
        elif number == 35 and wire == _VARINT:
            spec.byte_fallback = bool(value)
        elif number in _TRAINER_INTS and wire == _VARINT:
            setattr(spec, _TRAINER_INTS[number], _int32(value))
        elif number in _TRAINER_STRS and wire == _LEN:
            setattr(spec, _TRAINER_STRS[number], _text(value))
    return spec


def _parse_normalizer(buf: bytes) -> NormalizerSpec:
    spec = NormalizerSpec()
    for number, wire, value in _fields(buf):
        if number == 1 and wire == _LEN:
            spec.name = _text(value)
        elif number == 2 and wire == _LEN:
            spec.precompiled_charsmap = bytes(value)
        elif number in (3, 4, 5) and wire == _VARINT:
            name = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}[number]
            setattr(spec, name, bool(value))
    return spec


def parse_model_proto(data: bytes) -> ModelProto:
    """Read a serialized ModelProto; raises ProtoError on malformed input."""
    model = ModelProto()
    for number, wire, value in _fields(bytes(data)):
        if wire != _LEN:
            continue
        if number == 1:
            model.pieces.append(_parse_piece(value))
        elif number == 2:
            model.trainer_spec = _parse_trainer(value)
        elif number == 3:
            model.normalizer_spec = _parse_normalizer(value)
    if not model.pieces:
        raise ProtoError("no pieces")
    return model


# ---------------------------------------------------------------------------------------------------------
# writing


def _serialize_piece(piece: Piece) -> bytes:
    return (_str_field(1, piece.piece) + _key(2, _I32) + struct.pack("<f", piece.score)
            + _int_field(3, int(piece.type)))


def _serialize_trainer(spec: TrainerSpec) -> bytes:
    out = _int_field(3, int(spec.model_type)) + _int_field(35, spec.byte_fallback)
    for number, name in _TRAINER_INTS.items():
        out += _int_field(number, getattr(spec, name))
    for number, name in _TRAINER_STRS.items():
        out += _str_field(number, getattr(spec, name))
    return out


def _serialize_normalizer(spec: NormalizerSpec) -> bytes:
    out = _str_field(1, spec.name)
    if spec.precompiled_charsmap:
        out += _len_field(2, spec.precompiled_charsmap)
    return (out + _int_field(3, spec.add_dummy_prefix) + _int_field(4, spec.remove_extra_whitespaces)
            + _int_field(5, spec.escape_whitespaces))


def serialize_model_proto(model: ModelProto) -> bytes:
    """The ModelProto as protobuf bytes, loadable by `SentencePieceProcessor(model_proto=...)`."""
    parts = [_len_field(1, _serialize_piece(p)) for p in model.pieces]
    parts.append(_len_field(2, _serialize_trainer(model.trainer_spec)))
    parts.append(_len_field(3, _serialize_normalizer(model.normalizer_spec)))
    return b"".join(parts)
