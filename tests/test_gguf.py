"""GGUF reading and GGUF -> Llama: synthetic files written with the `gguf` package (a test-only dependency)."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

import refllama
from refllama.errors import CheckpointError, ConfigError
from refllama.formats.ggml_quants import GGMLType
from refllama.formats.gguf import GGUFFile

from conftest import FIXTURES

gguf = pytest.importorskip("gguf")

GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (HF rotate-half -> ggml adjacent pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_freq_factors(cfg: dict) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for llama3 scaling."""
    s = cfg["rope_scaling"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * cfg["rope_theta"] ** (i / dim)
        old = s["original_max_position_embeddings"]
        if wavelen < old / s["high_freq_factor"]:
            factors.append(1.0)
        elif wavelen > old / s["low_freq_factor"]:
            factors.append(s["factor"])
        else:
            smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def hf_folder_to_gguf(folder, out, with_rope_freqs: bool = False, for_llamacpp: bool = False):
    """Write an HF fixture as a llama.cpp-style GGUF (same tensor dtypes, q/k permuted, ggml names). `for_llamacpp`
    adds what llama.cpp itself requires: a vocabulary (placeholder pieces) and the attention head widths."""
    import ml_dtypes  # noqa: F401  (registers NumPy's "bfloat16" name, which safetensors.numpy reads by)
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    w = gguf.GGUFWriter(str(out), "llama")
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_bos_token_id(cfg["bos_token_id"])
    eos = cfg["eos_token_id"]
    w.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    if with_rope_freqs:
        w.add_tensor("rope_freqs.weight", _llama3_freq_factors(cfg))
    if for_llamacpp:
        w.add_key_length(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        w.add_value_length(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        w.add_tokenizer_model("llama")
        w.add_token_list([f"<t{i}>" for i in range(cfg["vocab_size"])])
        w.add_token_scores([0.0] * cfg["vocab_size"])
        w.add_token_types([gguf.TokenType.NORMAL] * cfg["vocab_size"])
    for name, array in sorted(tensors.items()):
        if name == "lm_head.weight" and cfg["tie_word_embeddings"]:
            continue
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            module, suffix = ".".join(rest[:-1]), rest[-1]
            if module == "self_attn.q_proj":
                array = _permute(array, heads)
            elif module == "self_attn.k_proj":
                array = _permute(array, kv)
            gname = f"blk.{i}.{GGUF_LAYER[module]}.{suffix}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        if array.dtype.name == "bfloat16":  # GGUFWriter takes bf16 as raw uint16 with raw_dtype
            w.add_tensor(gname, array.view(np.uint16), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(gname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("name", ["tinyllama", "bias", "sharded", "head_dim", "mha_linear"])
def test_gguf_export_of_a_fixture_is_the_same_model(tmp_path, name):
    """Un-permuting q/k (weights and biases; GQA, MQA, MHA; f16 and f32) restores exactly the HF weights."""
    path = hf_folder_to_gguf(FIXTURES / name, tmp_path / f"{name}.gguf")
    ours, reference = refllama.load(path, dtype="float64"), refllama.load(FIXTURES / name, dtype="float64")
    shape_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings", "attention_bias", "mlp_bias",
                    "tie_word_embeddings", "rope_theta", "rope_scaling", "hidden_act")
    for field in shape_fields:
        assert getattr(ours.config, field) == getattr(reference.config, field), field
    assert ours.config.rms_norm_eps == np.float32(reference.config.rms_norm_eps)  # GGUF stores it as f32
    for a, b in zip(ours.model.weights.tensors(), reference.model.weights.tensors(), strict=True):
        np.testing.assert_array_equal(a, b)
    ids = np.arange(20) % 64
    # Same weights, eps rounded to f32 by GGUF, and BLAS may sum differently aligned buffers in another order.
    np.testing.assert_allclose(ours.logits(ids), reference.logits(ids), rtol=0, atol=1e-11)


def test_tied_bf16_model_with_baked_llama3_rope_freqs(tmp_path):
    """llama.cpp bakes llama3 scaling into rope_freqs; applying it reproduces the HF folder's logits."""
    folder = FIXTURES / "llama32"
    path = hf_folder_to_gguf(folder, tmp_path / "l.gguf", with_rope_freqs=True)
    ids = np.arange(48) % 64
    ours = refllama.load(path, dtype="float64")
    assert ours.config.tie_word_embeddings and ours.config.rope_freq_factors is not None
    reference = refllama.load(folder, dtype="float64").logits(ids)
    # rope_freqs is stored in float32, so frequencies differ by ~1e-7 relative
    np.testing.assert_allclose(ours.logits(ids), reference, rtol=0, atol=1e-5)
    unscaled = refllama.load(hf_folder_to_gguf(folder, tmp_path / "u.gguf"), dtype="float64").logits(ids)
    assert np.abs(unscaled - reference).max() > 1e-3  # without it the model is different


def test_metadata_value_types_round_trip(tmp_path):
    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    VT = gguf.GGUFValueType
    values = {"u8": (7, VT.UINT8), "i8": (-7, VT.INT8), "u16": (600, VT.UINT16), "i16": (-600, VT.INT16),
              "u32": (70000, VT.UINT32), "i32": (-70000, VT.INT32), "f32": (0.1, VT.FLOAT32),
              "b": (True, VT.BOOL), "s": ("héllo ✓", VT.STRING), "u64": (2**40, VT.UINT64),
              "i64": (-(2**40), VT.INT64), "f64": (0.1, VT.FLOAT64)}
    for key, (value, vtype) in values.items():
        w.add_key_value(f"t.{key}", value, vtype)
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.strings", ["a", "", "ü"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = GGUFFile(path).metadata
    for key, (value, _) in values.items():
        if key == "f32":
            assert m["t.f32"] == np.float32(0.1)
        else:
            assert m[f"t.{key}"] == value
    assert m["t.ints"].tolist() == [1, 2, 3] and m["t.floats"].tolist() == [0.5, 1.5]
    assert m["t.strings"] == ["a", "", "ü"]
    assert m["general.architecture"] == "llama"


def _manual_gguf(version=3, n_dims=2, dims=(32, 2), type_id=0, offset=0, data=None, alignment=None):
    """A hand-assembled one-tensor GGUF, for malformed-file tests."""
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    kv = [(string("general.architecture"), 8, string("llama"))]
    if alignment is not None:
        kv.append((string("general.alignment"), 4, struct.pack("<I", alignment)))
    out = b"GGUF" + struct.pack("<IQQ", version, 1, len(kv))
    for key, vtype, value in kv:
        out += key + struct.pack("<I", vtype) + value
    out += string("w") + struct.pack("<I", n_dims) + b"".join(struct.pack("<Q", d) for d in dims)
    out += struct.pack("<IQ", type_id, offset)
    align = alignment or 32
    out += b"\0" * (-len(out) % align)
    return out + (data if data is not None else np.arange(64, dtype=np.float32).tobytes())


def test_versions_2_and_3_read_the_same(tmp_path):
    for version in (2, 3):
        path = tmp_path / f"v{version}.gguf"
        path.write_bytes(_manual_gguf(version=version))
        f = GGUFFile(path)
        assert f.version == version
        assert f.tensors["w"].shape == (2, 32) and f.tensors["w"].ggml_type is GGMLType.F32
        np.testing.assert_array_equal(f.get("w"), np.arange(64, dtype=np.float32).reshape(2, 32))
        assert not f.get("w").flags.owndata  # a view of the map


@pytest.mark.parametrize("kwargs,message", [
    ({"version": 1}, "GGUF version 1 is not supported"),
    ({"version": 0x03000000}, "big-endian"),
    ({"type_id": 99}, "unsupported ggml type id 99"),
    ({"type_id": 2, "dims": (48, 2)}, "not a multiple of Q4_0's block of 32"),
    ({"offset": 4}, "not aligned"),
    ({"data": b"\0" * 100}, "runs past the end of the file"),
    ({"alignment": 24}, "not a power of two"),
])
def test_malformed_files_raise_checkpoint_error(tmp_path, kwargs, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(_manual_gguf(**kwargs))
    with pytest.raises(CheckpointError, match=message) as info:
        GGUFFile(path)
    assert info.value.path == str(path)


def test_not_gguf_and_truncated(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGML" + b"\0" * 40)
    with pytest.raises(CheckpointError, match="magic"):
        GGUFFile(path)
    path.write_bytes(_manual_gguf()[:30])
    with pytest.raises(CheckpointError, match="truncated"):
        GGUFFile(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError):
        GGUFFile(path)


def test_non_llama_architecture_and_bad_shapes_name_the_gguf_key(tmp_path):
    path = hf_folder_to_gguf(FIXTURES / "tinyllama", tmp_path / "t.gguf")
    data = bytearray(path.read_bytes())
    i = data.find(b"llama.attention.head_count_kv")
    assert i > 0
    value_at = i + len(b"llama.attention.head_count_kv") + 4  # after the u32 value type
    data[value_at:value_at + 4] = struct.pack("<I", 3)  # 8 heads, 3 kv heads
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as info:
        refllama.load(path)
    assert info.value.field == "llama.attention.head_count_kv"
    other = tmp_path / "m.gguf"
    other.write_bytes(_manual_gguf().replace(b"llama", b"mamba"))
    with pytest.raises(ConfigError, match=r"general\.architecture"):
        refllama.load(other)
