from __future__ import annotations

import json

import pytest

from refllama import ActivationType, ConfigError, DataType, LlamaConfig, RopeScaling
from refllama.quant import QuantizationMethod

# Values as the public checkpoints publish them (config.json).
LLAMA_31_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 128256,
}
TINYLLAMA_CHAT = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 2048,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.35.0", "use_cache": True, "vocab_size": 32000,
}


def test_llama31_classic_config():
    c = LlamaConfig.from_dict(LLAMA_31_8B_INSTRUCT)
    assert (c.hidden_size, c.num_key_value_heads, c.head_dim, c.num_key_value_groups) == (4096, 8, 128, 4)
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert c.rope_theta == 500000.0
    assert c.eos_token_id == (128001, 128008, 128009)
    assert c.default_dtype is DataType.BF16
    assert c.hidden_act is ActivationType.Silu


def test_tinyllama_defaults():
    c = LlamaConfig.from_dict(TINYLLAMA_CHAT)
    assert c.rope_scaling is None and c.rope_theta == 10000.0
    assert c.head_dim == 64 and c.eos_token_id == (2,) and c.pad_token_id is None
    assert not c.attention_bias and not c.mlp_bias and not c.tie_word_embeddings


def test_transformers_v5_dialect_equals_classic():
    v5 = dict(LLAMA_31_8B_INSTRUCT)
    scaling = v5.pop("rope_scaling")
    theta = v5.pop("rope_theta")
    v5["rope_parameters"] = {**scaling, "rope_theta": theta}
    v5["dtype"] = v5.pop("torch_dtype")
    assert LlamaConfig.from_dict(v5) == LlamaConfig.from_dict(LLAMA_31_8B_INSTRUCT)


def test_legacy_type_key_and_default_rope_parameters():
    legacy = {**TINYLLAMA_CHAT, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert LlamaConfig.from_dict(legacy).rope_scaling == RopeScaling("linear", 2.0)
    v5 = {**TINYLLAMA_CHAT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    c = LlamaConfig.from_dict(v5)
    assert c.rope_scaling is None and c.rope_theta == 1e6


def test_generation_config_eos_union_and_overrides():
    c = LlamaConfig.from_dict({**TINYLLAMA_CHAT, "eos_token_id": [2, 5]},
                              {"eos_token_id": [5, 7], "pad_token_id": 0, "bos_token_id": 1})
    assert c.eos_token_id == (2, 5, 7)
    assert c.pad_token_id == 0


def test_explicit_head_dim_need_not_divide_hidden():
    c = LlamaConfig.from_dict({**TINYLLAMA_CHAT, "head_dim": 96, "num_attention_heads": 30,
                               "num_key_value_heads": 5})
    assert c.head_dim == 96


def test_quantization_config_is_parsed():
    block = {"quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],
             "config_groups": {"group_0": {
                 "targets": ["Linear"],
                 "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                             "dynamic": False, "group_size": None, "observer": "minmax"},
                 "input_activations": {"num_bits": 8, "symmetric": True, "strategy": "token", "dynamic": True}}}}
    q = LlamaConfig.from_dict({**TINYLLAMA_CHAT, "quantization_config": block}).quantization_config
    assert q.method is QuantizationMethod.CompressedTensors and q.ignored_layers == ["lm_head"]
    group = q.config_groups["group_0"]
    assert group.weights.strategy == "channel" and group.input_activations.dynamic
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True}
    q = LlamaConfig.from_dict({**TINYLLAMA_CHAT, "quantization_config": gptq}).quantization_config
    assert q.method is QuantizationMethod.GPTQ and q.config_groups["group_0"].weights.group_size == 128


@pytest.mark.parametrize("change,field", [
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": -4096}, "hidden_size"),
    ({"vocab_size": "32000"}, "vocab_size"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"intermediate_size": None}, "intermediate_size"),
    ({"num_attention_heads": 30, "num_key_value_heads": 30}, "num_attention_heads"),  # 2048 % 30, no head_dim
    ({"num_key_value_heads": 5}, "num_key_value_heads"),  # 32 % 5 != 0
    ({"head_dim": 0}, "head_dim"),
    ({"head_dim": 63}, "head_dim"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"hidden_act": "tanh"}, "hidden_act"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling.factor"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 0.5}}, "rope_scaling.factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
     "rope_scaling.original_max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                       "original_max_position_embeddings": 8192}}, "rope_scaling.high_freq_factor"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ({"eos_token_id": "</s>"}, "eos_token_id"),
    ({"bos_token_id": -1}, "bos_token_id"),
])
def test_invalid_fields_raise_config_error_naming_them(change, field):
    data = {**TINYLLAMA_CHAT, **change}
    data = {k: v for k, v in data.items() if not (k == "intermediate_size" and v is None)}
    with pytest.raises(ConfigError) as info:
        LlamaConfig.from_dict(data, source="x/config.json")
    assert info.value.field == field
    assert field in str(info.value) and "x/config.json" in str(info.value)


def test_from_dir_reads_generation_config_and_reports_bad_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINYLLAMA_CHAT))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 31999]}))
    assert LlamaConfig.from_dir(tmp_path).eos_token_id == (2, 31999)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LlamaConfig.from_dir(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        LlamaConfig.from_dir(tmp_path / "missing")


def test_datatype_parsing():
    assert DataType.parse("torch.bfloat16") is DataType.BF16
    assert DataType.parse("float64") is DataType.F64
    assert DataType.parse("F16") is DataType.F16
    assert DataType.parse("half") is DataType.F16
    with pytest.raises(ValueError):
        DataType.parse("float7")
    assert str(DataType.BF16.numpy_dtype) == "bfloat16"


def test_dynamic_rope_needs_head_dim_above_two():
    data = {**TINYLLAMA_CHAT, "head_dim": 2, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    with pytest.raises(ConfigError) as info:
        LlamaConfig.from_dict(data)
    assert info.value.field == "head_dim"
