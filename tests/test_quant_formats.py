"""Quantized checkpoint formats: config parsing and matching, bit packing, loader round trips, typed errors.

Round trips write a small random model in each on-disk layout with packers written here from the format
descriptions (docs/quantization.md), independently of refllama/quant/packing.py,
then load it: every Linear must dequantize to exactly (q - z) * s, and the quantized engine must give bit for bit
the logits of a float engine holding those dequantized weights (weight-only formats compute exactly that).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file

import refllama
from refllama.errors import ConfigError, InputError, RefLlamaError, WeightError
from refllama.formats.checkpoint import quantized_linears
from refllama.quant import Int8Weight, PackedIntWeight, dequantize, parse_quantization_config
from refllama.quant.config import read_quantize_config
from refllama.quant.packing import AWQ_ORDER, pack_awq, pack_rows, packed_words, unpack_awq, unpack_rows

# --- config -------------------------------------------------------------------------------------------------------

CT_W8A8 = {
    "quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "int-quantized",
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                              "dynamic": True}}},
}


def test_targets_ignore_and_specificity_follow_compressed_tensors():
    block = {"quant_method": "compressed-tensors", "format": "pack-quantized",
             "ignore": ["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj$"],
             "config_groups": {
                 "all": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 32}},
                 "attn": {"targets": ["re:.*self_attn\\.(q|k)_proj$"], "weights": {"num_bits": 8,
                                                                                  "strategy": "channel"}},
                 "one": {"targets": ["model.layers.0.self_attn.q_proj"], "format": "int-quantized",
                         "weights": {"num_bits": 8, "strategy": "tensor"}}}}
    q = parse_quantization_config(block)
    assert q.scheme_for("lm_head") is None
    assert q.scheme_for("model.layers.1.mlp.down_proj") is None
    assert q.scheme_for("model.layers.0.mlp.down_proj").weights.num_bits == 4  # class match
    assert q.scheme_for("model.layers.1.self_attn.k_proj").weights.strategy == "channel"  # regex beats class
    exact = q.scheme_for("model.layers.0.self_attn.q_proj")  # exact name beats regex
    assert exact.weights.strategy == "tensor" and q.group_format(exact) == "int-quantized"
    assert q.group_format(q.scheme_for("model.layers.0.mlp.up_proj")) == "pack-quantized"  # top-level format
    assert q.scheme_for("model.embed_tokens", "Embedding") is None  # "Linear" does not target embeddings


def test_gptq_and_awq_blocks_and_quantize_config_json(tmp_path):
    gptq = parse_quantization_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True,
                                      "sym": True, "checkpoint_format": "gptq"})
    spec = gptq.config_groups["group_0"].weights
    assert (spec.num_bits, spec.group_size, spec.actorder, spec.symmetric) == (4, 128, "group", True)
    assert gptq.scheme_for("lm_head") is None and gptq.scheme_for("model.layers.3.mlp.up_proj") is not None
    assert parse_quantization_config({"quant_method": "gptq", "bits": 4, "lm_head": True}).scheme_for("lm_head")
    awq = parse_quantization_config({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                     "version": "gemm", "modules_to_not_convert": ["down_proj"]})
    assert awq.format == "gemm" and not awq.config_groups["group_0"].weights.symmetric
    assert awq.scheme_for("model.layers.0.mlp.down_proj") is None  # substring match, as AutoAWQ does
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 8, "group_size": -1, "desc_act": False}))
    old = read_quantize_config(tmp_path)  # AutoGPTQ's file has no quant_method
    assert old.method.value == "gptq" and old.config_groups["group_0"].weights.strategy == "channel"


# --- packing ------------------------------------------------------------------------------------------------------

def _scalar_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """The format description, bit by bit: code i of a row occupies bits [i*b, i*b + b) of the row's stream."""
    rows, n = codes.shape
    words = np.zeros((rows, packed_words(n, bits)), dtype=np.uint64)
    for r in range(rows):
        for i in range(n):
            for b in range(bits):
                if int(codes[r, i]) >> b & 1:
                    pos = i * bits + b
                    words[r, pos // 32] |= np.uint64(1 << (pos % 32))
    return words.astype(np.uint32).view(np.int32)


@given(bits=st.integers(1, 8), rows=st.integers(1, 3), n=st.integers(1, 70), seed=st.integers(0, 2**32 - 1))
def test_dense_packing_matches_the_bit_stream_description(bits, rows, n, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, n)).astype(np.uint8)
    packed = pack_rows(codes, bits)
    np.testing.assert_array_equal(packed, _scalar_pack(codes, bits))
    np.testing.assert_array_equal(unpack_rows(packed, bits, n), codes)


def test_four_bit_word_layout_and_negative_words():
    codes = np.arange(16, dtype=np.uint8)[None, :8]  # one word: nibble k = k
    assert pack_rows(codes, 4)[0, 0] == 0x76543210
    high = np.full((1, 8), 0xF, np.uint8)  # 0xFFFFFFFF is int32 -1 on disk
    assert pack_rows(high, 4)[0, 0] == -1
    np.testing.assert_array_equal(unpack_rows(np.array([[-1]], np.int32), 4, 8), high)


def test_awq_nibble_order_with_an_asymmetric_pattern():
    codes = np.arange(16, dtype=np.uint8).reshape(1, 16) % 16  # every column distinct
    packed = pack_awq(codes)
    # nibble j of word c holds column 8c + ORDER[j]: word 0 = columns 0,2,4,6,1,3,5,7 from the low nibble up
    assert packed[0, 0] == sum(int(codes[0, AWQ_ORDER[j]]) << (4 * j) for j in range(8))
    np.testing.assert_array_equal(unpack_awq(packed), codes)
    assert not np.array_equal(unpack_rows(packed, 4, 16), codes)  # sequential unpacking permutes columns


# --- a small random model in every layout -------------------------------------------------------------------------

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 64,
          "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
LINEARS = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
           "self_attn.o_proj": (64, 64), "mlp.gate_proj": (96, 64), "mlp.up_proj": (96, 64),
           "mlp.down_proj": (64, 96)}
IDS = np.array([1, 5, 17, 63, 0, 42, 9, 33], dtype=np.int64)


def _float_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = {"model.embed_tokens.weight": rng.normal(0, 0.5, (64, 64)).astype(np.float32),
         "lm_head.weight": rng.normal(0, 0.1, (64, 64)).astype(np.float32),
         "model.norm.weight": (1 + rng.normal(0, 0.1, 64)).astype(np.float32)}
    for name in ("input_layernorm", "post_attention_layernorm"):
        t[f"model.layers.0.{name}.weight"] = (1 + rng.normal(0, 0.1, 64)).astype(np.float32)
    return t


def _scales(rng, shape, dtype=np.float16):
    return rng.uniform(0.002, 0.02, shape).astype(dtype)


def _write(folder, tensors, quantization_config, extra_files=None):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}  # save_file writes the memory order
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = dict(CONFIG)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    for name, data in (extra_files or {}).items():
        (folder / name).write_text(json.dumps(data))
    return folder


def _gptq_layout(rng, bits, group, act_order, version):
    """GPTQ qweight [in*b/32, out] packed along in, qzeros [G, out*b/32] packed along out (v1: zero - 1)."""
    tensors, expected = _float_tensors(rng), {}
    per = 32 // bits
    for name, (out_f, in_f) in LINEARS.items():
        p = f"model.layers.0.{name}."
        G = in_f // group
        u = rng.integers(0, 1 << bits, (out_f, in_f))
        zero = rng.integers(1, (1 << bits) - 1, (G, out_f))  # 1..2^b-2: v1's zero - 1 never hits -1
        scales = _scales(rng, (G, out_f))
        g_idx = rng.permutation(np.arange(in_f) // group) if act_order else np.arange(in_f) // group
        qweight = np.zeros((in_f // per, out_f), np.uint32)
        for i in range(in_f):
            qweight[i // per] |= (u[:, i].astype(np.uint32) << np.uint32(bits * (i % per)))
        stored_zero = zero - 1 if version == "gptq" else zero
        qzeros = np.zeros((G, out_f // per), np.uint32)
        for o in range(out_f):
            qzeros[:, o // per] |= stored_zero[:, o].astype(np.uint32) << np.uint32(bits * (o % per))
        tensors.update({p + "qweight": qweight.view(np.int32), p + "qzeros": qzeros.view(np.int32),
                        p + "scales": scales, p + "g_idx": g_idx.astype(np.int32)})
        expected[p[:-1]] = ((u - zero[g_idx].T).astype(np.float32) * scales[g_idx].T.astype(np.float32))
    block = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": False,
             "checkpoint_format": version}
    return tensors, block, expected


def _awq_layout(rng, group):
    """AWQ gemm: qweight [in, out/8] and qzeros [G, out/8], nibble j of word c = column 8c + ORDER[j]."""
    tensors, expected = _float_tensors(rng), {}
    for name, (out_f, in_f) in LINEARS.items():
        p = f"model.layers.0.{name}."
        G = in_f // group
        u = rng.integers(0, 16, (in_f, out_f))
        zero = rng.integers(0, 16, (G, out_f))
        scales = _scales(rng, (G, out_f))

        def pack(m):
            words = np.zeros((m.shape[0], m.shape[1] // 8), np.uint32)
            for c in range(m.shape[1] // 8):
                for j, col in enumerate(AWQ_ORDER):
                    words[:, c] |= m[:, 8 * c + col].astype(np.uint32) << np.uint32(4 * j)
            return words.view(np.int32)

        tensors.update({p + "qweight": pack(u), p + "qzeros": pack(zero), p + "scales": scales})
        g = np.arange(in_f) // group
        expected[p[:-1]] = ((u.T - zero[g].T).astype(np.float32) * scales[g].T.astype(np.float32))
    block = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    return tensors, block, expected


def _ct_layout(rng, fmt, bits, strategy, symmetric, group=32, activations=False):
    """compressed-tensors: int8 `weight` (int/naive-quantized) or `weight_packed` (offset codes along in),
    weight_scale [1] / [out, 1] / [out, G], weight_zero_point (pack: packed along dim 0)."""
    tensors, expected = _float_tensors(rng), {}
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for name, (out_f, in_f) in LINEARS.items():
        p = f"model.layers.0.{name}."
        G = in_f // group if strategy == "group" else 1
        q = rng.integers(lo, hi + 1, (out_f, in_f))
        q[0, :4] = lo  # the most negative code appears
        scale_shape = (1,) if strategy == "tensor" else (out_f, G)
        scale = _scales(rng, scale_shape, dtype=np.float32)
        zp = np.zeros(scale_shape, np.int64) if symmetric else rng.integers(lo, hi + 1, scale_shape)
        tensors[p + "weight_scale"] = scale
        if fmt == "pack-quantized":
            tensors[p + "weight_packed"] = _scalar_pack((q + (1 << (bits - 1))).astype(np.uint8), bits)
            tensors[p + "weight_shape"] = np.array([out_f, in_f], np.int64)
            if not symmetric:
                tensors[p + "weight_zero_point"] = _scalar_pack((zp + (1 << (bits - 1))).T.astype(np.uint8),
                                                                bits).T.copy()
        else:
            tensors[p + "weight"] = q.astype(np.int8)
            if not symmetric:
                tensors[p + "weight_zero_point"] = zp.astype(np.int8)
        s2, z2 = scale.reshape(-1, G) if strategy != "tensor" else scale.reshape(1, 1), zp.reshape(-1, G)
        g = np.arange(in_f) // group if strategy == "group" else np.zeros(in_f, np.int64)
        expected[p[:-1]] = (q - z2[:, g]).astype(np.float32) * s2[:, g].astype(np.float32)
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
               "group_size": group if strategy == "group" else None, "dynamic": False}
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    block = {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
             "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                           "input_activations": acts if activations else None}}}
    return tensors, block, expected


LAYOUTS = {
    "gptq-v1-4bit": lambda rng: _gptq_layout(rng, 4, 32, False, "gptq"),
    "gptq-v1-4bit-actorder": lambda rng: _gptq_layout(rng, 4, 32, True, "gptq"),
    "gptq-v2-8bit-actorder": lambda rng: _gptq_layout(rng, 8, 16, True, "gptq_v2"),
    "gptq-v1-2bit": lambda rng: _gptq_layout(rng, 2, 32, False, "gptq"),
    "awq-gemm": lambda rng: _awq_layout(rng, 32),
    "ct-pack-4bit-group-asym": lambda rng: _ct_layout(rng, "pack-quantized", 4, "group", False),
    "ct-pack-8bit-channel": lambda rng: _ct_layout(rng, "pack-quantized", 8, "channel", True),
    "ct-pack-3bit-group": lambda rng: _ct_layout(rng, "pack-quantized", 3, "group", True),
    "ct-pack-6bit-channel-asym": lambda rng: _ct_layout(rng, "pack-quantized", 6, "channel", False),
    "ct-int-8bit-tensor": lambda rng: _ct_layout(rng, "int-quantized", 8, "tensor", True),
    "ct-int-8bit-group-asym": lambda rng: _ct_layout(rng, "int-quantized", 8, "group", False),
    "ct-naive-4bit-channel": lambda rng: _ct_layout(rng, "naive-quantized", 4, "channel", True),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_loader_round_trip_dequantizes_exactly(tmp_path, layout):
    tensors, block, expected = LAYOUTS[layout](np.random.default_rng(sorted(LAYOUTS).index(layout)))
    folder = _write(tmp_path / "q", tensors, block)
    engine = refllama.load(folder)
    layer = engine.model.weights.layers[0]
    for name in LINEARS:
        weight = getattr(getattr(layer, "self_attention" if name.startswith("self_attn") else "mlp"),
                         name.split(".")[1]).weight
        assert isinstance(weight, Int8Weight | PackedIntWeight), name
        np.testing.assert_array_equal(dequantize(weight), expected[f"model.layers.0.{name}"], err_msg=name)
    # On the fly or at load (dequantize=True), the same weights and so bit for bit the same logits; and those of
    # a float checkpoint holding the expected weights (to float32 level: memory-mapped float weights can be
    # unaligned, which changes how numpy sums a matmul).
    logits = engine.logits(IDS)
    dequantized = refllama.GenericLlamaEngine(engine.config, _load_map(folder, dequantize=True), engine.backend)
    np.testing.assert_array_equal(dequantized.logits(IDS), logits)
    float_tensors = {k: v for k, v in tensors.items() if k.endswith(("embed_tokens.weight", "norm.weight",
                                                                     "lm_head.weight", "layernorm.weight"))}
    float_tensors.update({k + ".weight": v for k, v in expected.items()})
    reference = refllama.load(_write(tmp_path / "f", float_tensors, None))
    np.testing.assert_allclose(logits, reference.logits(IDS), rtol=0, atol=2e-5)


def _load_map(folder, **options):
    from refllama.config import LlamaConfig
    from refllama.formats.checkpoint import load_weight_map
    from refllama.formats.safetensors import TensorSource

    return load_weight_map(TensorSource(folder), LlamaConfig.from_dir(folder), **options)


def test_quantized_tensors_stay_zero_copy_views(tmp_path):
    tensors, block, _ = _ct_layout(np.random.default_rng(0), "int-quantized", 8, "channel", True)
    weights = _load_map(_write(tmp_path / "ct", tensors, block))
    for w in quantized_linears(weights):
        assert not w.q.flags.owndata and not w.q.flags.writeable  # read-only views of the memory map
    tensors, block, _ = _gptq_layout(np.random.default_rng(1), 4, 32, False, "gptq")
    for w in quantized_linears(_load_map(_write(tmp_path / "gptq", tensors, block))):
        assert isinstance(w, PackedIntWeight) and not w.packed.flags.owndata  # qweight.T, no copy
        assert w.g_idx is None  # g_idx == i // group_size is dropped


def test_quantized_lm_head_and_quantize_config_json(tmp_path):
    """GPTQ with `lm_head: true` quantizes the head; the block may live in quantize_config.json instead."""
    rng = np.random.default_rng(5)
    tensors, block, _ = _gptq_layout(rng, 4, 32, False, "gptq")
    head = rng.integers(0, 16, (64, 64))
    scales = _scales(rng, (2, 64))
    qweight = np.zeros((8, 64), np.uint32)
    for i in range(64):
        qweight[i // 8] |= head[:, i].astype(np.uint32) << np.uint32(4 * (i % 8))
    del tensors["lm_head.weight"]
    tensors.update({"lm_head.qweight": qweight.view(np.int32), "lm_head.scales": scales,
                    "lm_head.qzeros": np.full((2, 8), 0x77777777, np.uint32).view(np.int32),
                    "lm_head.g_idx": (np.arange(64) // 32).astype(np.int32)})
    block = {**block, "lm_head": True}
    folder = _write(tmp_path / "q", tensors, None, {"quantize_config.json": block})
    engine = refllama.load(folder)
    head_w = engine.model.weights.lm_head
    assert isinstance(head_w, PackedIntWeight) and head_w.zero is None  # all zeros 8: symmetric
    g = np.arange(64) // 32
    np.testing.assert_array_equal(dequantize(head_w), (head - 8).astype(np.float32) * scales[g].T.astype(np.float32))
    assert np.isfinite(engine.logits(IDS)).all()


# --- typed errors -------------------------------------------------------------------------------------------------

def _ct(**group_changes):
    block = json.loads(json.dumps(CT_W8A8))
    block["config_groups"]["group_0"].update(group_changes)
    return block


UNSUPPORTED = {
    "fp8 weights": (_ct(weights={"num_bits": 8, "type": "float", "strategy": "channel"}), "weights.type"),
    "block strategy": (_ct(weights={"num_bits": 8, "strategy": "block", "block_structure": [128, 128]}),
                       "weights.strategy"),
    "static activations": (_ct(input_activations={"num_bits": 8, "strategy": "tensor", "dynamic": False}),
                           "input_activations"),
    "asymmetric activations": (_ct(input_activations={"num_bits": 8, "strategy": "token", "dynamic": True,
                                                      "symmetric": False}), "input_activations"),
    "W8A8 with group weights": (_ct(weights={"num_bits": 8, "strategy": "group", "group_size": 32}), "weights"),
    "output activations": (_ct(output_activations={"num_bits": 8, "dynamic": True, "strategy": "token"}),
                           "output_activations"),
    "nvfp4 format": (_ct(format="nvfp4-pack-quantized"), "format"),
    "kv cache scheme": ({**CT_W8A8, "kv_cache_scheme": {"num_bits": 8, "type": "float"}}, "kv_cache_scheme"),
    "transforms": ({**CT_W8A8, "transform_config": {"config_groups": {"u": {"type": "hadamard"}}}},
                   "transform_config"),
    "3-bit gptq": ({"quant_method": "gptq", "bits": 3, "group_size": 32}, "bits"),
    "marlin gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "marlin"},
                    "checkpoint_format"),
    "awq gemv": ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "version"),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method"),
    "quantized embeddings": (_ct(targets=["Linear", "Embedding"]), "config_groups"),
    "W4A8 pack-quantized": (_ct(format="pack-quantized", weights={"num_bits": 4, "strategy": "channel"}),
                            "input_activations"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_schemes_we_cannot_run_raise_a_typed_error_naming_them(tmp_path, case):
    block, field = UNSUPPORTED[case]
    tensors, _, _ = _ct_layout(np.random.default_rng(0), "int-quantized", 8, "channel", True, activations=True)
    with pytest.raises(ConfigError) as info:
        refllama.load(_write(tmp_path / "q", tensors, block))
    assert field in info.value.field
    assert isinstance(info.value, RefLlamaError)


def test_missing_and_misshapen_quantized_tensors_are_named(tmp_path):
    tensors, block, _ = _ct_layout(np.random.default_rng(0), "pack-quantized", 4, "group", False)
    del tensors["model.layers.0.mlp.up_proj.weight_scale"]
    tensors["model.layers.0.self_attn.q_proj.weight_zero_point"] = np.zeros((64, 2), np.int32)  # unpacked
    tensors["model.layers.0.mlp.down_proj.weight_packed"] = tensors["model.layers.0.mlp.down_proj.weight_packed"] \
        .astype(np.int64)
    with pytest.raises(WeightError) as info:
        refllama.load(_write(tmp_path / "q", tensors, block))
    text = str(info.value)
    assert "missing tensors: model.layers.0.mlp.up_proj.weight_scale" in text
    assert "'model.layers.0.self_attn.q_proj.weight_zero_point' has shape [64, 2], the config needs [8, 2]" in text
    assert "'model.layers.0.mlp.down_proj.weight_packed' has dtype I64" in text
    assert "compressed-tensors" in text  # says which quantization fixed those names


def test_weight_shape_must_agree_with_the_config(tmp_path):
    tensors, block, _ = _ct_layout(np.random.default_rng(0), "pack-quantized", 4, "group", True)
    tensors["model.layers.0.mlp.up_proj.weight_shape"] = np.array([96, 63], np.int64)
    with pytest.raises(WeightError, match=r"up_proj\.weight_shape.*\[96, 63\]"):
        refllama.load(_write(tmp_path / "q", tensors, block))


def test_activation_semantics_name_is_checked(tmp_path):
    tensors, block, _ = _ct_layout(np.random.default_rng(0), "int-quantized", 8, "channel", True, activations=True)
    with pytest.raises(InputError, match="semantics"):
        _load_map(_write(tmp_path / "q", tensors, block), activation_semantics="tensorrt")
