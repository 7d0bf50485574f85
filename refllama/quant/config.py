"""QuantizationConfig (spec section 4) parsed from an HF `quantization_config` block.

Reads compressed-tensors blocks (config_groups, ignore, format) and the flat GPTQ/AWQ blocks
(bits, group_size, sym, desc_act). Running the schemes is the quantization issue's work; parsing them
here lets a config that carries one load and be described.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from refllama.errors import ConfigError


class QuantizationMethod(enum.Enum):
    CompressedTensors = "compressed-tensors"
    GPTQ = "gptq"
    AWQ = "awq"
    GGUF = "gguf"
    Custom = "custom"


@dataclass(frozen=True)
class QuantizationSpec:
    num_bits: int
    symmetric: bool = True
    dynamic: bool = False
    group_size: int | None = None
    strategy: str = "tensor"  # "tensor" | "channel" | "group" | "token" | ...
    observer: str = "minmax"
    type: str = "int"


@dataclass(frozen=True)
class QuantizationGroup:
    targets: list[str]
    weights: QuantizationSpec | None
    input_activations: QuantizationSpec | None = None
    output_activations: QuantizationSpec | None = None
    format: str | None = None


@dataclass(frozen=True)
class QuantizationConfig:
    method: QuantizationMethod
    format: str
    config_groups: dict[str, QuantizationGroup] = field(default_factory=dict)
    global_compression_ratio: float | None = None
    ignored_layers: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _spec(block: dict[str, Any] | None, where: str) -> QuantizationSpec | None:
    if block is None:
        return None
    if not isinstance(block, dict) or "num_bits" not in block:
        raise ConfigError(where, "expected an object with 'num_bits'")
    group_size = block.get("group_size")
    return QuantizationSpec(
        num_bits=int(block["num_bits"]),
        symmetric=bool(block.get("symmetric", True)),
        dynamic=bool(block.get("dynamic", False)),
        group_size=int(group_size) if group_size not in (None, -1) else None,
        strategy=str(block.get("strategy") or "tensor"),
        observer=str(block.get("observer") or "minmax"),
        type=str(block.get("type") or "int"),
    )


def parse_quantization_config(block: dict[str, Any]) -> QuantizationConfig:
    """Parse an HF `quantization_config` object; unknown methods become QuantizationMethod.Custom."""
    if not isinstance(block, dict):
        raise ConfigError("quantization_config", "expected an object")
    name = str(block.get("quant_method", "")).lower()
    try:
        method = QuantizationMethod(name)
    except ValueError:
        method = QuantizationMethod.Custom
    if method is QuantizationMethod.CompressedTensors:
        groups = {}
        for gname, g in (block.get("config_groups") or {}).items():
            where = f"quantization_config.config_groups.{gname}"
            groups[gname] = QuantizationGroup(
                targets=list(g.get("targets") or []),
                weights=_spec(g.get("weights"), f"{where}.weights"),
                input_activations=_spec(g.get("input_activations"), f"{where}.input_activations"),
                output_activations=_spec(g.get("output_activations"), f"{where}.output_activations"),
                format=g.get("format"),
            )
        return QuantizationConfig(
            method=method,
            format=str(block.get("format") or ""),
            config_groups=groups,
            global_compression_ratio=block.get("global_compression_ratio"),
            ignored_layers=list(block.get("ignore") or []),
            raw=dict(block),
        )
    if method in (QuantizationMethod.GPTQ, QuantizationMethod.AWQ):
        bits = block.get("bits", block.get("w_bit"))
        if bits is None:
            raise ConfigError("quantization_config.bits", f"missing for quant_method '{name}'")
        group_size = block.get("group_size", block.get("q_group_size"))
        weights = QuantizationSpec(
            num_bits=int(bits),
            symmetric=bool(block.get("sym", not block.get("zero_point", False))),
            group_size=int(group_size) if group_size not in (None, -1) else None,
            strategy="group" if group_size not in (None, -1) else "channel",
        )
        fmt = str(block.get("checkpoint_format") or block.get("version") or name)
        return QuantizationConfig(
            method=method,
            format=fmt,
            config_groups={"group_0": QuantizationGroup(targets=["Linear"], weights=weights)},
            ignored_layers=list(block.get("modules_to_not_convert") or []),
            raw=dict(block),
        )
    return QuantizationConfig(method=method, format=str(block.get("format") or name), raw=dict(block))
