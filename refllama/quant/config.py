"""The spec's QuantizationConfig, parsed from an HF `quantization_config` block or GPTQ's quantize_config.json.

Reads compressed-tensors blocks (config_groups with targets, weights / input_activations / output_activations
specs, ignore, per-group format) and the flat GPTQ/AWQ blocks (bits, group_size, sym, desc_act, zero_point).
`scheme_for(module)` says which scheme, if any, a Linear runs; `check_runnable` rejects, with a ConfigError naming
the scheme and the field, everything the reference cannot run exactly. Formats and their arithmetic are described
in docs/quantization.md.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refllama.errors import ConfigError, brief
from refllama.formats.files import ModelFolder, read_json


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
    strategy: str = "tensor"  # "tensor" | "channel" | "group" | "token" | "block" | ...
    observer: str = "minmax"
    type: str = "int"
    actorder: str | None = None  # "group" (g_idx stored), "weight" (calibration only), or None
    block_structure: tuple[int, ...] | None = None
    zp_dtype: str | None = None
    scale_dtype: str | None = None


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

    def group_format(self, group: QuantizationGroup) -> str:
        """The on-disk format of a group's tensors: the group's own `format` wins over the top-level one."""
        return group.format or self.format

    def scheme_for(self, module: str, class_name: str = "Linear") -> QuantizationGroup | None:
        """The config group whose targets match `module` (an HF module name), or None when it stays float.

        compressed-tensors' rules (`utils/match.py`): a target or ignore entry is an exact module name, a
        `re:` regex (re.match against the name) or a class name; the most specific match wins (exact name,
        then regex, then class). GPTQ/AWQ `modules_to_not_convert` entries match as substrings, as their
        loaders do, and GPTQ/AWQ leave lm_head float unless `lm_head: true`.
        """
        substring = self.method in (QuantizationMethod.GPTQ, QuantizationMethod.AWQ)
        if any(_matches(module, class_name, entry, substring) for entry in self.ignored_layers):
            return None
        best: tuple[int, QuantizationGroup] | None = None
        for group in self.config_groups.values():
            for target in group.targets:
                rank = _match_rank(module, class_name, target)
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, group)
        return best[1] if best else None


_LINEAR_CLASSES = ("Linear", "Module")  # torch.nn.Linear's MRO as compressed-tensors sees it


def _match_rank(module: str, class_name: str, target: str) -> int | None:
    if target == module:
        return 0
    if target.startswith("re:"):
        return 1 if re.match(target[3:], module) else None
    classes = _LINEAR_CLASSES if class_name == "Linear" else (class_name, "Module")
    return 2 if target in classes else None


def _matches(module: str, class_name: str, entry: str, substring: bool) -> bool:
    if substring and not entry.startswith("re:") and entry in module:
        return True
    return _match_rank(module, class_name, entry) is not None


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 1 << 31:
        raise ConfigError(where, f"expected an integer, got {brief(value)}")
    return value


def _optional_size(value: Any, where: str) -> int | None:
    """A group size: None or -1 mean none."""
    return None if value in (None, -1) else _int(value, where)


def _strings(value: Any, where: str) -> list[str]:
    """A list of module names or `re:` patterns (a lone string is a list of one)."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(where, f"expected a list of strings, got {brief(value)}")
    for v in values:
        if v.startswith("re:"):
            _check_pattern(v[3:], where)
    return list(values)


# A quantified group that itself holds a quantifier, e.g. (a+)+ or (.*)*: backtracking that is exponential in the
# module name's length. Python's re has no time limit, so such patterns are refused rather than run.
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[*+}](?:[^()\\]|\\.)*\)[*+{]")


def _check_pattern(pattern: str, where: str) -> None:
    if len(pattern) > 1000 or _NESTED_QUANTIFIER.search(pattern):
        raise ConfigError(where, f"regex {brief(pattern)} is too long or nests quantifiers (slow to match)")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        raise ConfigError(where, f"invalid regex {brief(pattern)}") from None


def _spec(block: dict[str, Any] | None, where: str) -> QuantizationSpec | None:
    if block is None:
        return None
    if not isinstance(block, dict) or "num_bits" not in block:
        raise ConfigError(where, "expected an object with 'num_bits'")
    group_size = _optional_size(block.get("group_size"), f"{where}.group_size")
    actorder = block.get("actorder")
    if actorder is True:
        actorder = "group"
    block_structure = block.get("block_structure")
    if block_structure and (not isinstance(block_structure, list) or len(block_structure) > 8):
        raise ConfigError(f"{where}.block_structure", f"expected a list of integers, got {brief(block_structure)}")
    return QuantizationSpec(
        num_bits=_int(block["num_bits"], f"{where}.num_bits"),
        symmetric=bool(block.get("symmetric", True)),
        dynamic=block.get("dynamic", False) not in (False, None),
        group_size=group_size,
        strategy=str(block.get("strategy") or ("group" if group_size is not None else "tensor"))[:100],
        observer=str(block.get("observer") or "minmax")[:100],
        type=str(block.get("type") or "int")[:100],
        actorder=str(actorder)[:100] if actorder not in (None, False) else None,
        block_structure=tuple(_int(b, f"{where}.block_structure") for b in block_structure)
        if block_structure else None,
        zp_dtype=str(block["zp_dtype"])[:100] if block.get("zp_dtype") else None,
        scale_dtype=str(block["scale_dtype"])[:100] if block.get("scale_dtype") else None,
    )


def parse_quantization_config(block: dict[str, Any]) -> QuantizationConfig:
    """Parse an HF `quantization_config` object; unknown methods become QuantizationMethod.Custom."""
    if not isinstance(block, dict):
        raise ConfigError("quantization_config", "expected an object")
    name = str(block.get("quant_method", ""))[:100].lower()
    try:
        method = QuantizationMethod(name)
    except ValueError:
        method = QuantizationMethod.Custom
    if method is QuantizationMethod.CompressedTensors:
        groups = {}
        config_groups = block.get("config_groups") or {}
        if not isinstance(config_groups, dict):
            raise ConfigError("quantization_config.config_groups", "expected an object")
        for gname, g in config_groups.items():
            where = f"quantization_config.config_groups.{gname[:100]}"
            if not isinstance(g, dict):
                raise ConfigError(where, "expected an object")
            fmt = g.get("format")
            if fmt is not None and not isinstance(fmt, str):
                raise ConfigError(f"{where}.format", f"expected a string, got {brief(fmt)}")
            groups[gname] = QuantizationGroup(
                targets=_strings(g.get("targets") or [], f"{where}.targets"),
                weights=_spec(g.get("weights"), f"{where}.weights"),
                input_activations=_spec(g.get("input_activations"), f"{where}.input_activations"),
                output_activations=_spec(g.get("output_activations"), f"{where}.output_activations"),
                format=fmt,
            )
        ratio = block.get("global_compression_ratio")
        return QuantizationConfig(
            method=method,
            format=str(block.get("format") or "")[:100],
            config_groups=groups,
            global_compression_ratio=ratio if isinstance(ratio, (int, float)) else None,
            ignored_layers=_strings(block.get("ignore") or [], "quantization_config.ignore"),
            raw=dict(block),
        )
    if method in (QuantizationMethod.GPTQ, QuantizationMethod.AWQ):
        bits = block.get("bits", block.get("w_bit"))
        if bits is None:
            raise ConfigError("quantization_config.bits", f"missing for quant_method '{name}'")
        group_size = _optional_size(block.get("group_size", block.get("q_group_size")),
                                    "quantization_config.group_size")
        desc_act = bool(block.get("desc_act", False))
        weights = QuantizationSpec(
            num_bits=_int(bits, "quantization_config.bits"),
            symmetric=bool(block.get("sym", not block.get("zero_point", False))),
            group_size=group_size,
            strategy="group" if group_size is not None else "channel",
            actorder="group" if desc_act else None,
        )
        fmt = str(block.get("checkpoint_format") or block.get("version") or name)[:100].lower()
        ignored = _strings(block.get("modules_to_not_convert") or [], "quantization_config.modules_to_not_convert")
        if not block.get("lm_head", False) and "lm_head" not in ignored:
            ignored.append("lm_head")  # GPTQ/AWQ quantize the head only when asked (`lm_head: true`)
        return QuantizationConfig(
            method=method,
            format=fmt,
            config_groups={"group_0": QuantizationGroup(targets=["Linear"], weights=weights)},
            ignored_layers=ignored,
            raw=dict(block),
        )
    return QuantizationConfig(method=method, format=str(block.get("format") or name)[:100], raw=dict(block))


def read_quantize_config(folder: str | Path | ModelFolder) -> QuantizationConfig | None:
    """GPTQ's `quantize_config.json` (AutoGPTQ / GPTQModel), for checkpoints whose config.json has no block."""
    folder = folder if isinstance(folder, ModelFolder) else ModelFolder(folder)
    path = folder.file("quantize_config.json", _config_error)
    if path is None:
        return None
    block = read_json(path, _config_error, limit=16 << 20)
    if not isinstance(block, dict):
        raise ConfigError("quantize_config.json", "expected an object", path)
    block.setdefault("quant_method", "gptq")  # AutoGPTQ's files predate the key
    return parse_quantization_config(block)


def _config_error(message: str, path: Path) -> ConfigError:
    return ConfigError("quantize_config.json", message, path)


# --- what the reference runs ------------------------------------------------------------------------------------

CT_FORMATS = ("int-quantized", "naive-quantized", "pack-quantized")
GPTQ_FORMATS = ("gptq", "gptq_v2")
GPTQ_BITS = (2, 4, 8)  # 3-bit GPTQ straddles words in a layout we have no checkpoint to test against
AWQ_FORMATS = ("gemm",)


def check_runnable(q: QuantizationConfig) -> None:
    """Raise ConfigError, naming the field and the scheme, for anything the reference cannot run exactly."""
    where = "quantization_config"
    if q.method is QuantizationMethod.GGUF:
        return  # GGUF tensors are dequantized by the GGUF reader
    if q.method is QuantizationMethod.Custom:
        raise ConfigError(f"{where}.quant_method",
                          f"quantization method {q.raw.get('quant_method')!r} is not supported "
                          "(supported: compressed-tensors, gptq, awq)")
    if q.method is QuantizationMethod.CompressedTensors:
        _check_ct_extras(q)
        for gname, group in q.config_groups.items():
            check_ct_group(q, gname, group)
        return
    spec = q.config_groups["group_0"].weights
    assert spec is not None
    if q.raw.get("dynamic"):
        raise ConfigError(f"{where}.dynamic", "per-module GPTQ overrides ('dynamic') are not supported")
    if q.method is QuantizationMethod.GPTQ:
        if q.format not in GPTQ_FORMATS:
            raise ConfigError(f"{where}.checkpoint_format",
                              f"GPTQ format {q.format!r} is not supported (supported: {', '.join(GPTQ_FORMATS)})")
        if spec.num_bits not in GPTQ_BITS:
            raise ConfigError(f"{where}.bits", f"{spec.num_bits}-bit GPTQ is not supported (supported: 2, 4, 8)")
    else:
        if q.format not in AWQ_FORMATS:
            raise ConfigError(f"{where}.version",
                              f"AWQ version {q.format!r} is not supported (supported: gemm)")
        if spec.num_bits != 4:
            raise ConfigError(f"{where}.bits", f"{spec.num_bits}-bit AWQ is not supported (the gemm layout is 4-bit)")


def _check_ct_extras(q: QuantizationConfig) -> None:
    where = "quantization_config"
    if q.raw.get("kv_cache_scheme"):
        raise ConfigError(f"{where}.kv_cache_scheme", "a quantized KV cache is not supported")
    sparsity = q.raw.get("sparsity_config") or {}
    if sparsity and str(sparsity.get("format", "dense")) != "dense":
        raise ConfigError(f"{where}.sparsity_config", f"sparse format {sparsity.get('format')!r} is not supported")
    if q.raw.get("transform_config"):
        raise ConfigError(f"{where}.transform_config", "weight/activation transforms are not supported")
    if q.raw.get("moe_sparsity_config"):
        raise ConfigError(f"{where}.moe_sparsity_config", "pruned experts (an MoE sparsity config) are not supported")


def check_ct_group(q: QuantizationConfig, gname: str, group: QuantizationGroup) -> None:
    """A compressed-tensors group the reference runs: int weights, and at most dynamic per-token int8 inputs."""
    where = f"quantization_config.config_groups.{gname}"
    fmt = q.group_format(group)
    if fmt not in CT_FORMATS:
        raise ConfigError(f"{where}.format",
                          f"compressed-tensors format {fmt!r} is not supported (supported: {', '.join(CT_FORMATS)})")
    w = group.weights
    if w is None:
        raise ConfigError(f"{where}.weights", "activation-only quantization (weights: null) is not supported")
    if w.type != "int":
        raise ConfigError(f"{where}.weights.type", f"{w.type!r} weights ({fmt}) are not supported, only int")
    if not 1 <= w.num_bits <= 8:
        raise ConfigError(f"{where}.weights.num_bits", f"{w.num_bits}-bit weights are not supported (1..8)")
    if fmt != "pack-quantized" and w.num_bits > 8:
        raise ConfigError(f"{where}.weights.num_bits", f"{fmt} stores codes as int8")
    if w.strategy not in ("tensor", "channel", "group"):
        raise ConfigError(f"{where}.weights.strategy", f"weight strategy {w.strategy!r} is not supported "
                          "(supported: tensor, channel, group)")
    if w.strategy == "group" and not w.group_size:
        raise ConfigError(f"{where}.weights.group_size", "group strategy needs a positive group_size")
    if w.dynamic:
        raise ConfigError(f"{where}.weights.dynamic", "dynamic weight quantization is not supported")
    if group.output_activations is not None:
        raise ConfigError(f"{where}.output_activations", "output activation quantization is not supported")
    a = group.input_activations
    if a is None:
        return
    scheme = f"W{w.num_bits}A{a.num_bits}"
    if fmt == "pack-quantized":
        raise ConfigError(f"{where}.input_activations", f"{scheme}: int8 activations with pack-quantized weights are "
                          "not supported (int-quantized / naive-quantized store the int8 codes the GEMM needs)")
    if not (a.type == "int" and a.num_bits == 8 and a.symmetric and a.dynamic and a.strategy == "token"):
        raise ConfigError(f"{where}.input_activations",
                          f"{scheme}: only dynamic, symmetric, per-token int8 input activations are supported "
                          f"(got type={a.type}, num_bits={a.num_bits}, symmetric={a.symmetric}, "
                          f"dynamic={a.dynamic}, strategy={a.strategy})")
    if not w.symmetric or w.strategy == "group":
        raise ConfigError(f"{where}.weights", f"{scheme}: int8 activations need symmetric per-channel or "
                          f"per-tensor weight scales (got symmetric={w.symmetric}, strategy={w.strategy})")
