"""The trace format as a contract: the names and shapes of a forward pass's intermediates, a validator whose
errors name the tensor and the shape it should have, and `.npz` files that carry a JSON manifest saying which
engine wrote them (docs/trace-format.md).

A trace is an ordered {name: array} for one sequence of T tokens, without a batch axis:

    embeddings                          (T, hidden)
    layers.N.input_norm                 (T, hidden)
    layers.N.q                          (heads, T, head_dim)     after RoPE
    layers.N.k, layers.N.v              (kv_heads, T, head_dim)  k after RoPE; KV heads, not repeated for GQA
    layers.N.attention_output           (T, hidden)              after o_proj (and its bias)
    layers.N.residual_attention         (T, hidden)
    layers.N.post_attention_norm        (T, hidden)
    layers.N.mlp_output                 (T, hidden)              after down_proj
    layers.N.residual                   (T, hidden)              the layer's output
    final_norm                          (T, hidden)
    logits                              (T, vocab)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refllama.dtypes import is_ml_float
from refllama.errors import RefLlamaError

LAYER_TENSORS = ("input_norm", "q", "k", "v", "attention_output", "residual_attention", "post_attention_norm",
                 "mlp_output", "residual")
MANIFEST_KEY = "__manifest__"  # the JSON manifest, stored in the .npz as a 0-d unicode array (no pickle)
MANIFEST_FIELDS = ("engine", "version", "dtype")
_LAYER = re.compile(r"layers\.(\d+)\.")


class TraceFormatError(RefLlamaError):
    """A trace does not follow the format: the message names every missing tensor and every wrong shape."""


@dataclass(frozen=True)
class TraceDims:
    """What fixes every shape of a trace."""

    tokens: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int

    @classmethod
    def of(cls, config, tokens: int) -> TraceDims:
        """From a refllama LlamaConfig (or anything with the same field names)."""
        return cls(tokens, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                   config.head_dim, config.vocab_size, config.num_hidden_layers)


def trace_names(layers: int) -> list[str]:
    """Every name of a trace of a model with `layers` layers, in the order of the forward pass."""
    return ["embeddings", *(f"layers.{i}.{n}" for i in range(layers) for n in LAYER_TENSORS), "final_norm", "logits"]


def expected_shapes(dims: TraceDims) -> dict[str, tuple[int, ...]]:
    """{name: shape} in trace order."""
    T, D = dims.tokens, dims.head_dim
    special = {"q": (dims.heads, T, D), "k": (dims.kv_heads, T, D), "v": (dims.kv_heads, T, D)}
    shapes = {}
    for name in trace_names(dims.layers):
        if name == "logits":
            shapes[name] = (T, dims.vocab)
        else:
            shapes[name] = special.get(name.rsplit(".", 1)[-1], (T, dims.hidden))
    return shapes


def _hint(name: str) -> str:
    if name.endswith((".k", ".v")):
        return " (KV heads, not repeated per query head; no batch axis)"
    if name.endswith(".q"):
        return " (heads, tokens, head_dim: after RoPE; no batch axis)"
    return " (no batch axis)"


def validate_trace(trace: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], *,
                   allow_missing: bool = False, source: str = "trace") -> list[str]:
    """Check `trace` against `expected` ({name: shape}, from `expected_shapes` or a reference trace's shapes).

    Raises TraceFormatError listing every tensor with the wrong shape or a non-numeric dtype, and every missing
    one unless `allow_missing`; returns the names that are missing (empty when the trace is complete). Names the
    format does not know are ignored."""
    problems, missing = [], []
    for name, shape in expected.items():
        if name not in trace:
            missing.append(name)
            continue
        value = np.asarray(trace[name])
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)
                or is_ml_float(value.dtype)):  # bfloat16 traces (ml_dtypes) from half-precision engines
            problems.append(f"'{name}' has dtype {value.dtype}, expected a float array")
        elif value.shape != tuple(shape):
            problems.append(f"'{name}' has shape {value.shape}, expected {tuple(shape)}{_hint(name)}")
    if missing and not allow_missing:
        problems.append(f"{len(missing)} tensors missing: {', '.join(missing[:12])}"
                        + (f", ... ({len(missing) - 12} more)" if len(missing) > 12 else ""))
    if problems:
        raise TraceFormatError(f"{source}: " + "; ".join(problems))
    return missing


def dims_of(trace: dict[str, np.ndarray]) -> TraceDims:
    """The dimensions a complete, well-formed trace implies (from embeddings, layers.0.q / .k and logits)."""
    for name in ("embeddings", "layers.0.q", "layers.0.k", "logits"):
        if name not in trace or np.ndim(trace[name]) != (3 if name.startswith("layers") else 2):
            raise TraceFormatError(f"cannot read the model's dimensions: '{name}' is missing or has the wrong "
                                   f"number of axes")
    T, hidden = np.shape(trace["embeddings"])
    heads, _, head_dim = np.shape(trace["layers.0.q"])
    layers = 1 + max(int(m.group(1)) for m in map(_LAYER.match, trace) if m)
    return TraceDims(T, hidden, heads, np.shape(trace["layers.0.k"])[0], head_dim, np.shape(trace["logits"])[1],
                     layers)


def save_trace(path: str | Path, trace: dict[str, np.ndarray], *, engine: str, version: str, dtype: str,
               **extra: object) -> None:
    """Write a trace as `.npz` with its manifest (engine, version, dtype, and any JSON-able `extra`, e.g. ids)."""
    manifest = {"engine": engine, "version": version, "dtype": dtype, **extra}
    np.savez_compressed(path, **{MANIFEST_KEY: np.array(json.dumps(manifest))}, **trace)


def load_trace(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """A trace `.npz` and its manifest ({} for a file without one); never unpickles."""
    try:
        with np.load(path, allow_pickle=False) as data:
            trace = {k: data[k] for k in data.files if k != MANIFEST_KEY}
            raw = str(data[MANIFEST_KEY]) if MANIFEST_KEY in data.files else None
    except (OSError, ValueError) as e:
        raise TraceFormatError(f"{path}: not a readable trace .npz ({e})") from None
    manifest = {}
    if raw is not None:
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TraceFormatError(f"{path}: '{MANIFEST_KEY}' is not JSON ({e})") from None
        if not isinstance(manifest, dict):
            raise TraceFormatError(f"{path}: '{MANIFEST_KEY}' must be a JSON object")
    return trace, manifest


def label(manifest: dict, fallback: str) -> str:
    """How `refllama compare` names one side: 'engine version (dtype)' from the manifest, else `fallback`."""
    if not manifest:
        return fallback
    return " ".join(str(manifest.get(f, "?")) for f in MANIFEST_FIELDS[:2]) + f" ({manifest.get('dtype', '?')})"
