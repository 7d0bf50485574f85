"""LlamaConfig: the model's shape and numerics, from a Hugging Face `config.json`.

Tolerant of keys we do not use (configs carry plenty), strict about the ones we do: a missing, mistyped or
inconsistent field raises ConfigError naming it. Both config dialects are read:

* classic (what published checkpoints ship): top-level `rope_theta`, `rope_scaling` with `type` or
  `rope_type`, `torch_dtype`;
* transformers v5: `rope_parameters` = {"rope_type", "rope_theta", scaling keys...} and `dtype`.

Defaults for absent optional keys are those of transformers' LlamaConfig, so a config means the same
model here as there.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refllama.dtypes import DataType, LayerDataTypeConfig
from refllama.errors import ConfigError, brief
from refllama.formats.files import ModelFolder, read_json
from refllama.quant.config import QuantizationConfig, parse_quantization_config


class ActivationType(enum.Enum):
    """The MLP's gate activation. GELU is the exact (erf) form, as HF's "gelu"; GELU_TANH its tanh form."""

    Silu = "silu"
    Swish = "swish"
    Gelu = "gelu"
    GeluTanh = "gelu_pytorch_tanh"
    Relu = "relu"


_ACTIVATION_ALIASES = {"gelu_new": "gelu_pytorch_tanh", "gelu_fast": "gelu_pytorch_tanh"}

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

# Sane limits. Every published Llama-family config is far below them (the largest: a 262k vocabulary, hidden
# 16384, intermediate 53248, 126 layers, 128 heads, a 10M context). Larger values come from malformed or hostile
# files, and would size loops and allocations before the weights on disk could disprove them.
LIMITS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_hidden_layers": 1 << 12,
    "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "head_dim": 1 << 12,
    "max_position_embeddings": 1 << 24, "original_max_position_embeddings": 1 << 24,
    "num_local_experts": 1 << 12, "num_experts_per_tok": 1 << 12,
}

# model_type -> the architecture it names, and its transformers config defaults where they differ from Llama's
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "llama4_text": "Llama4ForCausalLM",
               "llama4": "Llama4ForConditionalGeneration"}
_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"rope_theta": 1e6, "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5},
    "llama4_text": {"rope_theta": 5e5, "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5, "head_dim": 128},
}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling; `rope_type` is "llama3", "linear" or "dynamic" (unscaled RoPE has none)."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None


class Router(enum.Enum):
    """How an MoE layer turns router logits into expert weights (refllama/model/moe.py has the arithmetic)."""

    Softmax = "softmax"  # Mixtral: softmax over all experts, top-k, renormalise over the k
    Sigmoid = "sigmoid"  # Llama 4: top-k of the raw logits, sigmoid of those; the expert input is scaled


@dataclass(frozen=True)
class MoEConfig:
    """A sparse mixture-of-experts MLP: which layers have one, and its shape."""

    num_experts: int  # num_local_experts
    top_k: int  # num_experts_per_tok
    intermediate_size: int  # per expert (and of Llama 4's shared expert)
    router: Router
    layers: tuple[int, ...]  # the MoE layers; the others keep the dense MLP (config.intermediate_size)
    shared_expert: bool = False  # Llama 4: a dense MLP of intermediate_size added to the routed sum


@dataclass(frozen=True)
class LlamaConfig:
    # Core architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # resolved: config's value, else hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    # Activation and normalization
    hidden_act: ActivationType = ActivationType.Silu
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # RoPE
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None  # GGUF `rope_freqs`: inv_freq[i] is divided by factor i
    # Tokens
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    # Data types
    default_dtype: DataType = DataType.F32
    layer_dtypes: LayerDataTypeConfig | None = None
    # Quantization
    quantization_config: QuantizationConfig | None = None
    # Mixture of experts (Mixtral, Llama 4); None for dense models
    moe: MoEConfig | None = None
    # Attention variants (Mixtral's sliding window; Llama 4's RoPE form, NoPE layers, chunks, QK norm, temperature)
    sliding_window: int | None = None  # a query sees the last `sliding_window` positions, itself included
    rope_interleaved: bool = False  # RoPE on adjacent pairs (2i, 2i+1) (Llama 4's complex form), not rotate-half
    nope_layers: tuple[int, ...] = ()  # layers without RoPE (Llama 4's no_rope_layers[i] == 0)
    attention_chunk_size: int | None = None  # chunked layers attend only within chunks of this many positions
    chunked_layers: tuple[int, ...] = ()  # Llama 4: its RoPE layers, unless config.json's layer_types says otherwise
    qk_norm: bool = False  # weightless RMSNorm on q and k after RoPE, on RoPE layers
    attn_temperature: tuple[float, float] | None = None  # (floor_scale, attn_scale): q scaling on NoPE layers
    model_type: str = "llama"
    name_or_path: str | None = field(default=None, compare=False)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.layers

    def uses_rope(self, layer: int) -> bool:
        return layer not in self.nope_layers

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per KV head (GQA): query head h reads KV head h // groups."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dir(cls, path: str | Path, *, allow_symlinks: bool = False) -> LlamaConfig:
        """Read `config.json` and, when present, `generation_config.json` from a model folder (files reached as
        `refllama.formats.files.ModelFolder` allows)."""
        folder = ModelFolder(path, allow_symlinks=allow_symlinks)
        config_path = folder.path / "config.json"
        data = _read_json(folder.file("config.json", _config_error) or config_path)
        quantize_config = folder.file("quantize_config.json", _config_error)
        if "quantization_config" not in data and quantize_config is not None:
            # AutoGPTQ / GPTQModel checkpoints may carry their block only there (its quant_method, else gptq)
            data = {**data, "quantization_config": {"quant_method": "gptq", **_read_json(quantize_config)}}
        generation_path = folder.file("generation_config.json", _config_error)
        generation = _read_json(generation_path) if generation_path is not None else None
        return cls.from_dict(data, generation, source=config_path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], generation_config: dict[str, Any] | None = None,
                  source: str | Path | None = None) -> LlamaConfig:
        """Build and validate a config from config.json's object (and generation_config.json's)."""
        if not isinstance(data, dict):
            raise ConfigError("<root>", "config must be a JSON object", source)
        if generation_config is not None and not isinstance(generation_config, dict):
            raise ConfigError("<root>", "generation config must be a JSON object", source)
        data = _text_config(data, source)
        model_type = data.get("model_type", "llama")
        if not isinstance(model_type, str):
            raise ConfigError("model_type", f"expected a string, got {brief(model_type)}", source)
        data = {**_TYPE_DEFAULTS.get(model_type, {}), **data}
        r = _Reader(data, source)
        hidden_size = r.positive_int("hidden_size")
        heads = r.positive_int("num_attention_heads")
        kv_heads = r.positive_int("num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise ConfigError("num_key_value_heads",
                              f"{kv_heads} does not divide num_attention_heads={heads}", source)
        head_dim = r.positive_int("head_dim", default=None)
        if head_dim is None:
            if hidden_size % heads:
                raise ConfigError("num_attention_heads", f"{heads} does not divide hidden_size={hidden_size} "
                                  "and no head_dim is given", source)
            head_dim = hidden_size // heads
        if head_dim % 2:
            raise ConfigError("head_dim", f"RoPE needs an even head_dim, got {head_dim}", source)

        rope_theta, rope_scaling = _parse_rope(data, r, source)
        if rope_scaling is not None and rope_scaling.rope_type == "dynamic" and head_dim <= 2:
            raise ConfigError("head_dim", f"dynamic NTK scaling needs head_dim > 2 (it raises the base to the "
                              f"power d/(d-2)), got {head_dim}", source)

        act_name = r.string("hidden_act", default="silu")
        try:
            hidden_act = ActivationType(_ACTIVATION_ALIASES.get(act_name, act_name))
        except ValueError:
            supported = ", ".join(a.value for a in ActivationType)
            raise ConfigError("hidden_act", f"unsupported activation {brief(act_name)} (supported: {supported})",
                              source) from None

        dtype_name = data.get("dtype", data.get("torch_dtype")) or "float32"
        try:
            default_dtype = DataType.parse(dtype_name) if isinstance(dtype_name, str) else DataType.Custom
        except ValueError:
            default_dtype = DataType.Custom

        quant_block = data.get("quantization_config")
        try:
            quantization = parse_quantization_config(quant_block) if quant_block is not None else None
        except ConfigError as e:
            raise ConfigError(e.field, e.message, source) from None

        vocab_size = r.positive_int("vocab_size")
        readers = [r, _Reader(generation_config, source)] if generation_config else [r]
        for reader in readers:  # each file's ids must lie in the vocabulary, even those the other file overrides
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                outside = [t for t in reader.token_ids(key, default=None) if t >= vocab_size]
                if outside:
                    raise ConfigError(key, f"token id {outside[0]} is outside the vocabulary (vocab_size "
                                      f"{vocab_size})", source)
        bos = r.token_id("bos_token_id", default=1)
        eos = _merge_eos(r.token_ids("eos_token_id", default=[2]),
                         _Reader(generation_config, source).token_ids("eos_token_id", default=[])
                         if generation_config else [])
        pad = r.token_id("pad_token_id", default=None)
        if generation_config:
            g = _Reader(generation_config, source)
            bos = g.token_id("bos_token_id", default=bos)
            pad = g.token_id("pad_token_id", default=pad)

        num_layers = r.positive_int("num_hidden_layers")
        variant = _architecture_variant(model_type, r, num_layers)
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=r.positive_int("intermediate_size_mlp" if model_type == "llama4_text"
                                             else "intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=r.positive_int("max_position_embeddings", default=2048),
            hidden_act=hidden_act,
            rms_norm_eps=r.positive_float("rms_norm_eps", default=1e-6),
            attention_bias=r.boolean("attention_bias", default=False),
            mlp_bias=r.boolean("mlp_bias", default=False),
            tie_word_embeddings=r.boolean("tie_word_embeddings", default=False),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            bos_token_id=bos,
            eos_token_id=tuple(eos),
            pad_token_id=pad,
            default_dtype=default_dtype,
            quantization_config=quantization,
            model_type=str(model_type)[:100],
            name_or_path=data.get("_name_or_path") if isinstance(data.get("_name_or_path"), str) else None,
            **variant,
        )


    def to_hf_dict(self) -> dict[str, Any]:
        """This config as a classic transformers config.json object (what from_dict reads back unchanged)."""
        if self.model_type != "llama":
            raise ConfigError("model_type", f"only dense Llama configs can be written back, not {self.model_type!r}")
        if self.rope_freq_factors is not None:
            raise ConfigError("rope_freq_factors", "per-frequency RoPE factors (GGUF rope_freqs) have no "
                              "config.json equivalent")
        s = self.rope_scaling
        rope_scaling = None if s is None else {
            k: v for k, v in {"rope_type": s.rope_type, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings": s.original_max_position_embeddings}.items()
            if v is not None}
        data = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act.value, "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings, "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.default_dtype.value if self.default_dtype.is_float else "float32",
        }
        return data


def _config_error(message: str, path: Path) -> ConfigError:
    return ConfigError("<file>", message, path)


def _text_config(data: dict[str, Any], source: str | Path | None) -> dict[str, Any]:
    """A Llama 4 multimodal config (model_type "llama4") holds the text model's config under `text_config`."""
    if data.get("model_type") != "llama4":
        return data
    text = data.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError("text_config", "a llama4 config needs its text model's config as an object", source)
    return {**text, "model_type": "llama4_text", "_name_or_path": data.get("_name_or_path")}


def _architecture_variant(model_type: str, r: _Reader, num_layers: int) -> dict[str, Any]:
    """The LlamaConfig fields of Mixtral and Llama 4 text configs (empty for Llama), with transformers' defaults."""
    if model_type == "mixtral":
        moe = _moe(r, Router.Softmax, default_experts=8, default_top_k=2, layers=tuple(range(num_layers)))
        return {"moe": moe, "sliding_window": r.positive_int("sliding_window", default=None)}
    if model_type != "llama4_text":
        return {}
    step = r.positive_int("interleave_moe_layer_step", default=1)
    layers = r.data.get("moe_layers")
    if layers is None:
        layers = list(range(step - 1, num_layers, step))
    layers = _layer_list(r, "moe_layers", layers, num_layers)
    moe = _moe(r, Router.Sigmoid, default_experts=16, default_top_k=1, layers=tuple(sorted(set(layers))),
               shared_expert=True)
    interval = r.positive_int("no_rope_layer_interval", default=4)
    uses_rope = r.data.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
    if (not isinstance(uses_rope, list) or len(uses_rope) != num_layers
            or any(v not in (0, 1) or isinstance(v, float) for v in uses_rope)):
        raise r._fail("no_rope_layers", f"expected {num_layers} flags of 0 or 1 (1: the layer uses RoPE)")
    temperature = None
    if r.boolean("attn_temperature_tuning", default=True):
        temperature = (r.positive_float("floor_scale", default=8192.0), r.positive_float("attn_scale", default=0.1))
    chunk = r.data.get("attention_chunk_size", 8192)
    chunk = None if chunk is None else r.positive_int("attention_chunk_size", default=8192)
    kinds = r.data.get("layer_types")  # transformers builds its masks from this list when a config has one
    if kinds is None:
        kinds = ["chunked_attention" if v and chunk is not None else "full_attention" for v in uses_rope]
    if (not isinstance(kinds, list) or len(kinds) != num_layers
            or any(k not in ("chunked_attention", "full_attention") for k in kinds)):
        raise r._fail("layer_types", f"expected {num_layers} of 'chunked_attention' or 'full_attention'")
    chunked = tuple(i for i, k in enumerate(kinds) if k == "chunked_attention")
    if chunked and chunk is None:
        raise r._fail("attention_chunk_size", "chunked_attention layers need a chunk size")
    return {"moe": moe, "rope_interleaved": True, "nope_layers": tuple(i for i, v in enumerate(uses_rope) if not v),
            "attention_chunk_size": chunk, "chunked_layers": chunked,
            "qk_norm": r.boolean("use_qk_norm", default=True), "attn_temperature": temperature}


def _moe(r: _Reader, router: Router, *, default_experts: int, default_top_k: int, layers: tuple[int, ...],
         shared_expert: bool = False) -> MoEConfig:
    experts = r.positive_int("num_local_experts", default=default_experts)
    top_k = r.positive_int("num_experts_per_tok", default=default_top_k)
    if top_k > experts:
        raise r._fail("num_experts_per_tok", f"{top_k} exceeds num_local_experts={experts}")
    return MoEConfig(experts, top_k, r.positive_int("intermediate_size"), router, layers, shared_expert)


def _layer_list(r: _Reader, key: str, value: Any, num_layers: int) -> list[int]:
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < num_layers
                                          for v in value):
        raise r._fail(key, f"expected a list of layer indices below num_hidden_layers={num_layers}, got {value!r}")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json(path, _config_error, limit=16 << 20)
    if not isinstance(data, dict):
        raise ConfigError("<root>", "expected a JSON object", path)
    return data


def _merge_eos(config_ids: list[int], generation_ids: list[int]) -> list[int]:
    """The stop set is the union of config.json's and generation_config.json's eos ids, in first-seen order."""
    merged: list[int] = []
    for token in [*config_ids, *generation_ids]:
        if token not in merged:
            merged.append(token)
    return merged


def _parse_rope(data: dict[str, Any], r: _Reader, source: str | Path | None) -> tuple[float, RopeScaling | None]:
    """Read rope_theta and the scaling block from either dialect; v5's rope_parameters wins when present."""
    params = data.get("rope_parameters")
    field_name = "rope_parameters"
    if params is None:
        params = data.get("rope_scaling")
        field_name = "rope_scaling"
    if params is not None and not isinstance(params, dict):
        raise ConfigError(field_name, "expected an object or null", source)
    params = dict(params or {})
    theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
    theta = _Reader({"rope_theta": theta}, source).positive_float("rope_theta")

    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{field_name}.rope_type",
                          f"unsupported RoPE type {brief(rope_type)} (supported: {', '.join(ROPE_TYPES)})", source)
    if rope_type == "default":
        return theta, None

    p = _Reader(params, source, prefix=f"{field_name}.")
    factor = p.positive_float("factor")
    if rope_type == "dynamic" and factor < 1.0:
        raise ConfigError(f"{field_name}.factor", f"dynamic NTK scaling needs factor >= 1, got {factor}", source)
    if rope_type != "llama3":
        original = p.positive_int("original_max_position_embeddings", default=None)
        return theta, RopeScaling(rope_type, factor, original_max_position_embeddings=original)
    low = p.positive_float("low_freq_factor")
    high = p.positive_float("high_freq_factor")
    if high <= low:
        raise ConfigError(f"{field_name}.high_freq_factor",
                          f"must exceed low_freq_factor ({high} <= {low})", source)
    original = p.positive_int("original_max_position_embeddings")
    return theta, RopeScaling("llama3", factor, low, high, original)


class _Reader:
    """Typed access to config fields; every failure names the field."""

    def __init__(self, data: dict[str, Any], source: str | Path | None, prefix: str = ""):
        self.data, self.source, self.prefix = data, source, prefix

    def _fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.prefix + key, message, self.source)

    _MISSING = object()

    def _get(self, key: str, default: Any) -> Any:
        value = self.data.get(key, default)
        if value is self._MISSING:
            raise self._fail(key, "required field is missing")
        return value

    def positive_int(self, key: str, default: Any = _MISSING) -> Any:
        """A positive integer, at most LIMITS[key] when the key has a limit."""
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise self._fail(key, f"expected a positive integer, got {brief(value)}")
        if value <= 0:
            raise self._fail(key, f"must be positive, got {value}")
        limit = LIMITS.get(key)
        if limit is not None and value > limit:
            raise self._fail(key, f"{value} is over the limit of {limit} (no real model comes near it)")
        return value

    def positive_float(self, key: str, default: Any = _MISSING) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(key, f"expected a positive number, got {brief(value)}")
        number = float(value) if not isinstance(value, int) or abs(value) < 1 << 1000 else math.inf
        if not (number > 0 and math.isfinite(number)):
            raise self._fail(key, f"must be a finite positive number, got {brief(value)}")
        return number

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, f"expected true or false, got {brief(value)}")
        return value

    def string(self, key: str, default: Any = _MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self._fail(key, f"expected a string, got {brief(value)}")
        return value

    def token_id(self, key: str, default: Any = _MISSING) -> int | None:
        value = self._get(key, default)
        if isinstance(value, list):  # some configs write a single-element list
            if len(value) != 1:
                raise self._fail(key, f"expected one token id, got {brief(value)}")
            value = value[0]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self._fail(key, f"expected a non-negative integer token id, got {brief(value)}")
        return value

    def token_ids(self, key: str, default: Any = _MISSING) -> list[int]:
        value = self._get(key, default)
        if value is None:
            return []
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise self._fail(key, f"expected token ids (an integer or a list of them), got {brief(value)}")
        return list(values)
