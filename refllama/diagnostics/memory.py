"""Memory: what a model needs once loaded (MemoryRequirements), backend configuration, and the enforced limit.

The estimate counts what actually sits in memory while a model generates, as the numpy backend lays it out:

* weights as they will be after loading: float tensors in the compute dtype (converted, or mapped pages that
  generation touches), GGUF blocks dequantized, integer (quantized) tensors as stored, and what a backend reads
  in place (numba: bfloat16 matrices, GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K blocks) as stored;
* the KV cache: 2 x layers x batch x kv_heads x context x head_dim in the compute dtype;
* activations of the largest prefill step: the residual stream and the peak of a layer (attention scores with
  their softmax temporaries, or the MLP's gate/up temporaries, or the logits), whichever is largest;
* runtime overhead: the tokenizer's tables and the GGUF metadata (measured per vocabulary entry) and the
  Python objects of a load.

`tools/measure_memory.py` and tests/test_memory.py compare the estimate with the peak RSS growth of a real
load + generate (within 15%).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from refllama import backends
from refllama.config import ActivationType, LlamaConfig
from refllama.dtypes import DataType
from refllama.errors import BackendError, InputError, RefLlamaError, brief
from refllama.formats.gguf_llama import hf_name
from refllama.sharding.plan import StagePlan, balance, check_bounds, fewest_stages, spans

if TYPE_CHECKING:
    from refllama.diagnostics.diagnostic import WeightInfo

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Measured: building SmolLM2's 49,152-token byte-level BPE tokenizer plus the GGUF vocabulary arrays costs
# ~39 MB of RSS, about 800 bytes per vocabulary entry (tools/measure_memory.py prints the breakdown).
TOKENIZER_BYTES_PER_TOKEN = 800
# Python-side objects of a load (config, weight map, cache bookkeeping, masks): about 64 KiB, measured on the
# tiny fixtures, where it is a visible share of the total.
LOAD_OVERHEAD_BYTES = 64 * 1024
# A pipeline stage reading a GGUF file parses its metadata (the vocabulary arrays among it) but builds no tokenizer:
# 11.1 MiB for SmolLM2's 49,152 entries, about 240 bytes an entry (measured by tests/test_sharding_ray.py).
GGUF_METADATA_BYTES_PER_TOKEN = 240


@dataclass(frozen=True)
class BackendConfig:
    """Which backend, compute precision, memory limit and workload a model is loaded for (the spec's BackendConfig)."""

    backend: str = "numpy"  # a name in refllama.backends.names()
    precision: DataType = DataType.F32
    memory_limit: int | None = None  # bytes
    context_length: int | None = None  # default: max_position_embeddings
    batch_size: int = 1
    quantization_support: bool = True
    # pipeline stages: a count, explicit split points (0, ..., layers), or "auto" (the fewest that fit the
    # memory limit, which is then per stage); None: one device
    shards: int | tuple[int, ...] | str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or self.backend not in backends.names():
            raise BackendError(f"unknown backend {brief(self.backend)} (available: {', '.join(backends.names())})")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {brief(self.batch_size)}")
        if self.context_length is not None and (not _is_int(self.context_length) or self.context_length < 1):
            raise InputError(f"context_length must be an integer >= 1 or None, got {brief(self.context_length)}")
        if self.memory_limit is not None and (not _is_int(self.memory_limit) or self.memory_limit < 0):
            raise InputError(f"memory_limit must be a number of bytes >= 0 or None, got {brief(self.memory_limit)}")
        if not isinstance(self.quantization_support, bool):
            raise InputError(f"quantization_support must be True or False, got {brief(self.quantization_support)}")
        if isinstance(self.shards, str) and self.shards != "auto":
            raise InputError(f"shards must be a count, split points or 'auto', got {self.shards!r}")

    def with_backend(self, name: str) -> BackendConfig:
        return replace(self, backend=name)

    def with_memory_limit(self, limit: int | str) -> BackendConfig:
        return replace(self, memory_limit=parse_bytes(limit))

    def with_precision(self, dtype: DataType | str) -> BackendConfig:
        return replace(self, precision=DataType.parse(dtype))

    def with_context_length(self, n: int) -> BackendConfig:
        return replace(self, context_length=n)

    def with_batch_size(self, n: int) -> BackendConfig:
        """The batch the memory estimate assumes and the most rows one `generate` call runs together."""
        return replace(self, batch_size=n)

    def with_quantization_support(self, enabled: bool) -> BackendConfig:
        """False: weight-only quantized weights and GGUF blocks are dequantized to float at load."""
        return replace(self, quantization_support=enabled)

    def with_model_sharding(self, shards: int | Sequence[int] | str) -> BackendConfig:
        """Split the model by layers into pipeline stages (docs/sharding.md): a count balanced by bytes, split
        points [0, ..., layers], or "auto": the fewest stages of which each fits the memory limit."""
        return replace(self, shards=shards if isinstance(shards, int | str) else tuple(shards))


# --- Memory optimizations (the spec's MemoryOptimization), each with the figure that makes the model fit --------

@dataclass(frozen=True)
class QuantizeToDataType:
    dtype: DataType
    total_bytes: int  # the estimate with weights in this type


@dataclass(frozen=True)
class ReduceKVCacheSize:
    context_length: int  # the longest context that fits


@dataclass(frozen=True)
class UseModelSharding:
    num_shards: int  # devices of the limit's size needed
    plan: StagePlan | None = None  # the stages, each within the limit (None: not even one layer per stage fits)


@dataclass(frozen=True)
class ReduceBatchSize:
    batch_size: int  # the largest batch that fits


@dataclass(frozen=True)
class UseBackend:
    """Not in the spec's list: another backend that reads the weights as stored (numba: GGUF blocks, bfloat16)
    needs less memory for the same model."""

    backend: str
    total_bytes: int  # the estimate on that backend


@dataclass(frozen=True)
class EnableGradientCheckpointing:
    """In the spec for completeness, never emitted: inference keeps no activations for a backward pass, so
    recomputing them saves nothing."""


MemoryOptimization = QuantizeToDataType | UseBackend | ReduceKVCacheSize | UseModelSharding | ReduceBatchSize


@dataclass(frozen=True)
class MemoryRequirements:
    model_weights: int
    kv_cache: int
    activation_memory: int
    runtime_overhead: int
    total_estimated: int
    context_length: int
    batch_size: int
    backend: str
    dtype: DataType
    recommendations: list[MemoryOptimization] = field(default_factory=list)


class MemoryLimitError(RefLlamaError):
    """The model would not fit the memory limit; `recommendations` say what would make it fit."""

    def __init__(self, requirements: MemoryRequirements, limit: int):
        self.requirements, self.limit = requirements, limit
        self.recommendations = requirements.recommendations
        hints = "; ".join(describe(r) for r in self.recommendations) or "no configuration fits"
        super().__init__(f"the model needs about {format_bytes(requirements.total_estimated)} "
                         f"({format_bytes(requirements.model_weights)} weights, "
                         f"{format_bytes(requirements.kv_cache)} KV cache) but the limit is {format_bytes(limit)}: "
                         f"{hints}")


class AllocationError(RefLlamaError):
    """A buffer asked for at run time (a KV cache) would exceed the memory limit, or cannot be allocated at all."""


class MemoryManager:
    """Tracks what a loaded engine holds against an optional limit."""

    def __init__(self, available_memory: int | None = None):
        self.available_memory = available_memory
        self.allocated_memory = 0
        self.kv_cache_reserved = 0  # the KV cache the admitted estimate counted: a run-time cache may use it

    def reserve(self, requirements: MemoryRequirements) -> None:
        """Admit a model: raise MemoryLimitError (before anything large is allocated) if it cannot fit."""
        if self.available_memory is not None and \
                self.allocated_memory + requirements.total_estimated > self.available_memory:
            raise MemoryLimitError(requirements, self.available_memory - self.allocated_memory)
        self.allocated_memory += requirements.total_estimated
        self.kv_cache_reserved += requirements.kv_cache

    def check(self, nbytes: int, what: str) -> None:
        """Before a large run-time allocation (a KV cache): AllocationError when `nbytes` is more than the limit
        leaves, counting the KV cache admitted at load as available. Nothing to check without a limit."""
        if self.available_memory is None:
            return
        headroom = self.available_memory - self.allocated_memory + self.kv_cache_reserved
        if nbytes > headroom:
            raise AllocationError(f"{what} needs {format_bytes(nbytes)}, but the memory limit of "
                                  f"{format_bytes(self.available_memory)} leaves {format_bytes(max(headroom, 0))} "
                                  "for it")


def _itemsize(dtype: DataType) -> int:
    return {DataType.F64: 8, DataType.F32: 4, DataType.F16: 2, DataType.BF16: 2}[dtype]


def reads_as_stored(backend: str) -> frozenset[str]:
    """The stored types `backend` reads in place (Backend.reads_as_stored); nothing for a backend that is not
    installed here (the estimate then counts its weights converted, an over-estimate)."""
    if backend not in backends.names():
        raise BackendError(f"unknown backend {backend!r} (available: {', '.join(backends.names())})")
    try:
        return backends.backend_class(backend).reads_as_stored
    except BackendError:
        return frozenset()


def weights_in_memory(weights: WeightInfo, dtype: DataType, backend: str = "numpy") -> int:
    """Weights after loading: float tensors (and dequantized GGUF blocks) in the compute dtype; integer tensors
    (quantized checkpoints) and what the backend reads in place (Backend.reads_as_stored) as stored."""
    return sum(tensor_bytes(weights, dtype, backend).values())


def tensor_bytes(weights: WeightInfo, dtype: DataType, backend: str = "numpy") -> dict[str, int]:
    """Each tensor's bytes after loading (as `weights_in_memory` counts them), by its name as stored."""
    s = _itemsize(dtype)
    in_place = reads_as_stored(backend)
    out = {}
    for t in weights.tensors:
        if t.dtype in in_place and (t.dtype != "BF16" or len(t.shape) == 2):  # bf16 vectors become float32
            out[t.name] = t.nbytes
        elif t.dtype in FLOAT_DTYPES or t.dtype.startswith(("Q", "GGUF")):
            out[t.name] = t.numel * s
        else:
            out[t.name] = t.nbytes
    return out


def kv_cache_bytes(config: LlamaConfig, dtype: DataType, context: int, batch: int, layers: int | None = None) -> int:
    """Keys and values of `layers` layers (default: all of them)."""
    layers = config.num_hidden_layers if layers is None else layers
    return 2 * layers * batch * config.num_key_value_heads * context * config.head_dim * _itemsize(dtype)


def activation_bytes(config: LlamaConfig, dtype: DataType, tokens: int, context: int, batch: int,
                     head: bool = True) -> int:
    """Peak temporaries of one prefill step of `tokens` new tokens attending over `context` positions.

    The largest of three phases of a layer, as the numpy backend runs it (checked against tracemalloc):
    attention holds the residual x and its norm, q and the attention output, one (B, H, T, S) score buffer and
    the mask (k and v live in the KV cache by then); the MLP holds x, its norm, gate, up and the activation's
    temporaries; the head holds x, its norm and the logits (only where `head`: a pipeline stage before the last
    has none). The cos/sin tables live through the whole step.
    """
    c, s, B, T, S = config, _itemsize(dtype), batch, tokens, context
    H, D, hd, inter = c.num_attention_heads, c.hidden_size, c.head_dim, c.intermediate_size
    attention = s * (2 * B * T * D + 2 * B * H * T * hd + B * H * T * S) + 2 * B * T * S
    mlp = s * (2 * B * T * D + 4 * B * T * inter)
    if c.hidden_act is ActivationType.Gelu:  # exact GELU goes through math.erf: an object array of Python
        mlp += 40 * B * T * inter  # floats (8 + 24 bytes an element) and its float conversion alongside
    final = s * (2 * B * T * D + B * T * c.vocab_size) if head else 0
    tables = s * 2 * B * T * hd
    return max(attention, mlp, final) + tables


def estimate(config: LlamaConfig, weights: WeightInfo, backend: str = "numpy", dtype: DataType = DataType.F32,
             context_length: int | None = None, batch_size: int = 1, prefill_tokens: int | None = None,
             memory_limit: int | None = None, vocab_entries: int = 0) -> MemoryRequirements:
    """MemoryRequirements for running the model; with `memory_limit`, the recommendations that make it fit."""
    context = context_length or config.max_position_embeddings
    tokens = min(prefill_tokens or context, context)
    w = weights_in_memory(weights, dtype, backend)
    kv = kv_cache_bytes(config, dtype, context, batch_size)
    act = activation_bytes(config, dtype, tokens, tokens, batch_size)  # a prefill from an empty cache
    overhead = vocab_entries * TOKENIZER_BYTES_PER_TOKEN + LOAD_OVERHEAD_BYTES
    total = w + kv + act + overhead
    req = MemoryRequirements(w, kv, act, overhead, total, context, batch_size, backend, dtype)
    if memory_limit is None or total <= memory_limit:
        return req
    return replace(req, recommendations=_recommendations(config, weights, req, tokens, memory_limit))


def _recommendations(config: LlamaConfig, weights: WeightInfo, req: MemoryRequirements, tokens: int,
                     limit: int) -> list[MemoryOptimization]:
    """What would make `req` fit `limit`, each with its figure; the other parts stay as estimated."""
    dtype, context, batch = req.dtype, req.context_length, req.batch_size
    w, overhead = req.model_weights, req.runtime_overhead
    out: list[MemoryOptimization] = []
    rest = req.activation_memory + overhead + req.kv_cache
    for name in backends.names():  # a backend that keeps more of the weights as stored, in the same dtype
        try:
            fits_dtype = name != req.backend and dtype in backends.backend_class(name).dtypes
        except BackendError:
            continue  # not installed here
        if fits_dtype and weights_in_memory(weights, dtype, name) + rest <= limit:
            out.append(UseBackend(name, weights_in_memory(weights, dtype, name) + rest))
    for qtype, bytes_per_weight in ((DataType.W8A16, 1.0 + 2 / 128), (DataType.W4A16, 0.5 + 2 / 32)):
        quantized = _quantized_weights(weights, dtype, bytes_per_weight)
        if quantized + rest <= limit:
            out.append(QuantizeToDataType(qtype, quantized + rest))
            break
    # the longest context (KV cache and the prefill over it) that fits
    lo, hi = 0, context
    while lo < hi:
        mid = (lo + hi + 1) // 2
        need = w + overhead + kv_cache_bytes(config, dtype, mid, batch) + activation_bytes(
            config, dtype, min(tokens, mid), min(tokens, mid), batch)
        lo, hi = (mid, hi) if need <= limit else (lo, mid - 1)
    if 0 < lo < context:
        out.append(ReduceKVCacheSize(lo))
    if batch > 1:
        fits = [b for b in range(batch - 1, 0, -1)
                if w + overhead + kv_cache_bytes(config, dtype, context, b)
                + activation_bytes(config, dtype, tokens, tokens, b) <= limit]
        if fits:
            out.append(ReduceBatchSize(fits[0]))
    try:
        plan = stage_plan(config, weights, "auto", req.backend, dtype, context, batch, limit)
        out.append(UseModelSharding(plan.num_stages, plan))
    except RefLlamaError:
        out.append(UseModelSharding(max(2, math.ceil(req.total_estimated / limit))))
    return out


def stage_plan(config: LlamaConfig, weights: WeightInfo, shards: int | Sequence[int] | str,
               backend: str = "numpy", dtype: DataType = DataType.F32, context_length: int | None = None,
               batch_size: int = 1, memory_limit: int | None = None) -> StagePlan:
    """How the layers split into pipeline stages, with each stage's predicted bytes.

    `shards`: a number of stages, balanced so the largest needs the least memory; split points [0, ..., layers];
    or "auto", the fewest stages of which each fits `memory_limit` (one node's memory). A stage needs its weights,
    its layers' KV cache, the activations of a prefill of the whole context (the last stage's include the
    logits) and the load overhead: the GGUF metadata it parses, and the source pages of the largest tensor it
    converts, resident while that tensor converts. The driver's tokenizer is not counted.
    """
    L, tied = config.num_hidden_layers, config.tie_word_embeddings
    context = context_length or config.max_position_embeddings
    layer_weights, embed, head = [0] * L, 0, 0
    stored_bytes = {t.name: t.nbytes for t in weights.tensors}
    shard = {t.name: t.shard for t in weights.tensors if t.shard}
    holds: dict[str, str] = {}  # stored name -> HF name
    for stored, nbytes in tensor_bytes(weights, dtype, backend).items():
        name = hf_name(stored) or stored
        holds[stored] = name
        if name.startswith("model.layers.") and name.split(".")[2].isdigit():
            layer_weights[int(name.split(".")[2])] += nbytes
        elif name.startswith("model.embed_tokens."):
            embed += nbytes
            head += nbytes if tied else 0
        else:
            head += nbytes
    converted = {stored: stored_bytes[stored] for stored, nbytes in tensor_bytes(weights, dtype, backend).items()
                 if nbytes != stored_bytes[stored]}
    metadata = config.vocab_size * GGUF_METADATA_BYTES_PER_TOKEN \
        if any(f.endswith(".gguf") for f in weights.files) else 0
    kv_layer = kv_cache_bytes(config, dtype, context, batch_size, layers=1)
    act = activation_bytes(config, dtype, context, context, batch_size, head=False)
    act_last = activation_bytes(config, dtype, context, context, batch_size, head=True)
    layer_memory = [w + kv_layer for w in layer_weights]

    def build(bounds: tuple[int, ...]) -> StagePlan:
        w, m, files = [], [], []
        for span in spans(bounds):
            files.append(tuple(sorted({f for stored, f in shard.items() if span.holds(holds[stored], tied)})))
            stage_weights = sum(layer_weights[span.first:span.last]) + (embed if span.embeds else 0) \
                + (head if span.head else 0)
            if span.embeds and span.head and tied:
                stage_weights -= embed  # one table serves both ends
            w.append(stage_weights)
            peak = max((b for stored, b in converted.items() if span.holds(holds[stored], tied)), default=0)
            m.append(stage_weights + kv_layer * (span.last - span.first) + (act_last if span.head else act)
                     + LOAD_OVERHEAD_BYTES + metadata + peak)
        return StagePlan(bounds, tuple(w), tuple(m), tuple(files))

    if shards == "auto":
        if memory_limit is None:
            raise InputError("shards='auto' needs a memory limit (per node) to size the stages by")
        bounds = fewest_stages(layer_memory, embed, head + act_last - act,
                               lambda b: max(build(b).memory_bytes) <= memory_limit)
        if bounds is None:
            largest = max(build(balance(layer_memory, embed, head + act_last - act, L)).memory_bytes)
            raise RefLlamaError(f"even one layer per stage needs {format_bytes(largest)} on its largest stage, "
                                f"over the limit of {format_bytes(memory_limit)}")
        return build(bounds)
    if isinstance(shards, int):
        return build(balance(layer_memory, embed, head + act_last - act, shards))
    if isinstance(shards, str):
        raise InputError(f"shards must be a count, split points or 'auto', got {shards!r}")
    return build(check_bounds(shards, L))


def _quantized_weights(weights: WeightInfo, dtype: DataType, bytes_per_weight: float) -> int:
    """Weights with every projection matrix quantized (embeddings, norms and the head stay in `dtype`)."""
    s = _itemsize(dtype)
    total = 0
    for t in weights.tensors:
        projection = len(t.shape) == 2 and ".layers." in t.name
        total += int(t.numel * bytes_per_weight) if projection else t.numel * s
    return total


def describe(o: MemoryOptimization) -> str:
    if isinstance(o, QuantizeToDataType):
        return f"quantize weights to {o.dtype.name} (about {format_bytes(o.total_bytes)} in all)"
    if isinstance(o, UseBackend):
        return f"use the {o.backend} backend (about {format_bytes(o.total_bytes)} in all)"
    if isinstance(o, ReduceKVCacheSize):
        return f"reduce the context to {o.context_length} tokens"
    if isinstance(o, ReduceBatchSize):
        return f"reduce the batch to {o.batch_size}"
    if o.plan is not None:
        layers = ", ".join(f"{s.first}-{s.last - 1}" for s in o.plan.spans)
        return f"shard the model over {o.num_shards} devices (layers {layers}; docs/sharding.md)"
    return f"shard the model over {o.num_shards} devices"


_UNITS = {"B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


MAX_BYTES = 1 << 60  # an exbibyte: larger "sizes" are typos (or "inf")


def parse_bytes(value: int | str) -> int:
    """16000000000 (an int: bytes), "16GB", "16 GiB", "512MB", "100B" -> bytes; InputError for anything else
    (negative, inf, nan, ...). A string needs its unit: "16" alone is more likely 16 GB meant than 16 bytes, so it
    is refused rather than guessed."""
    if _is_int(value) and 0 <= value <= MAX_BYTES:
        return int(value)
    problem = InputError(f"not a size: {brief(value)} (examples: 16GB, 512MB, 8GiB; at most 1 EiB)")
    if not isinstance(value, str) or len(value) > 40:
        raise problem
    text = value.strip().upper().replace(" ", "")
    if text.isdigit() or text.replace(".", "", 1).isdigit():  # a bare number: 16 bytes or 16 GB meant?
        raise InputError(f"a size needs a unit: {brief(value)} (examples: 16GB, 512MB, 8GiB, 100B)")
    number = text.rstrip("KMGTIB")
    unit = text[len(number):]
    try:
        size = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise problem from None
    if not 0 <= size <= MAX_BYTES:  # also false for nan; inf is over the limit
        raise problem
    return int(size)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
