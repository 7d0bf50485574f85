"""Pipeline stages in this process: each stage a span of layers on its own backend (and CUDA device).

A stage runs the forward pass's own pieces (refllama/model/llama.py): `embed` on the first stage, `forward_layers`
over its span, `head` on the last; its KV cache holds only its layers. Nothing is recomputed or reordered, so a
pipeline's logits are bit-identical to one device's. Each stage reads only its own tensors from disk (its
resident memory is its share of the model).

With `devices=["cuda:0", "cuda:1", ...]` (the cupy backend) each stage runs on its device and the residual stream
is copied peer to peer between them; without, every stage runs on the backend's default device and the array is
handed on as it is.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refllama.backends import Backend, backend_class, get_backend
from refllama.config import LlamaConfig
from refllama.diagnostics.diagnostic import ModelDiagnostic, TensorEntry, WeightInfo
from refllama.diagnostics.memory import stage_plan
from refllama.dtypes import DataType
from refllama.errors import CheckpointError, InputError
from refllama.formats.checkpoint import expected_shapes
from refllama.loading import read_model, take_weights
from refllama.model.kv_cache import KVCache
from refllama.model.llama import LlamaModel
from refllama.model.weights import StageSpan, WeightMap
from refllama.sharding.plan import StagePlan

Array = Any


class Stage:
    """One span of layers with its weights, on one backend and device."""

    def __init__(self, config: LlamaConfig, weights: WeightMap, backend: Backend, span: StageSpan,
                 device: int | None = None):
        """`weights`: the span's tensors, already the backend's arrays (the rest None)."""
        self.config, self.backend, self.span, self.device = config, backend, span, device
        self.model = LlamaModel(config, weights, backend)

    @classmethod
    def load(cls, path: str | Path, span: StageSpan, backend: str, dtype: str | DataType, device: int | None = None,
             *, dequantize: bool = False, quant_semantics: str = "hf",
             progress: Callable[[int, int], None] | None = None) -> Stage:
        """Read and convert only the span's tensors (of a sharded folder, only the shard files holding them)."""
        ops = stage_backend(backend, dtype, device)
        with on_device(device):
            files = read_model(path, ops, dequantize=dequantize, quant_semantics=quant_semantics, span=span,
                               tokenizer=False)
            return cls(files.config, take_weights(files.weights, ops, progress), ops, span, device)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for this stage's layers only."""
        c, s = self.config, self.span
        with on_device(self.device):
            return KVCache(self.backend, s.last - s.first, batch, c.num_key_value_heads, max_len, c.head_dim,
                           first_layer=s.first)

    def run(self, x: Array, cache: KVCache, attention_mask: np.ndarray | None = None,
            positions: np.ndarray | None = None, last_only: bool = False, trace: dict | None = None) -> Array:
        """This stage's part of one forward call.

        x: token ids (B, T) on the first stage, else the residual stream (B, T, hidden) from the stage before.
        Returns the residual stream (B, T, hidden), or on the last stage the logits (B, T or 1, vocab). The mask
        and positions mean what they mean in LlamaModel.forward; each stage derives the same RoPE tables and mask
        from them.
        """
        m, s = self.model, self.span
        with on_device(self.device):
            step = m.step_inputs(x.shape[:2], cache.length, attention_mask, positions)  # ids or stream: (B, T, ...)
            # nested, as in LlamaModel.forward: no name here holds the stage's input while its layers run
            h = m.forward_layers(m.embed(x, trace) if s.embeds else self.receive(x), s.first, s.last, cache, step,
                                 trace)  # (B, T, hidden)
            cache.advance(h.shape[1])
            return m.head(h, trace, last_only) if s.head else h

    def receive(self, x: Array) -> Array:
        """The residual stream from the stage before, as this stage's array: a host array (from a Ray actor, or
        the numpy backend's own) through `asarray`, a peer-to-peer copy from another CUDA device, else the very
        array the stage before (same backend, this process) returned."""
        if isinstance(x, np.ndarray):
            return self.backend.asarray(x)
        source = getattr(getattr(x, "device", None), "id", None)  # a CuPy array's device
        if self.device is not None and source is not None and source != self.device:
            return x.copy()  # CuPy copies to the current device (on_device(self.device) is active)
        return x


class PipelineCache:
    """A KV cache per stage for one batch; every stage holds the same `length` filled slots."""

    def __init__(self, parts: list[KVCache]):
        self.parts = parts

    @property
    def length(self) -> int:
        return self.parts[0].length

    @property
    def max_len(self) -> int:
        return self.parts[0].max_len


class Pipeline:
    """Stages in this process, run one after another on the same residual stream."""

    def __init__(self, config: LlamaConfig, stages: list[Stage], plan: StagePlan):
        self.config, self.stages, self.plan = config, stages, plan

    @classmethod
    def load(cls, path: str | Path, config: LlamaConfig, plan: StagePlan, backend: str, dtype: str | DataType,
             devices: Sequence[str] | None = None, **options: Any) -> Pipeline:
        """Load each stage of `plan` (options: dequantize, quant_semantics); `devices`, one per stage."""
        if devices is not None and len(devices) != plan.num_stages:
            raise InputError(f"devices={list(devices)} names {len(devices)} devices for {plan.num_stages} stages")
        ids = [parse_device(d) for d in devices] if devices is not None else [None] * plan.num_stages
        stages = [Stage.load(path, span, backend, dtype, device, **options)
                  for span, device in zip(plan.spans, ids, strict=True)]
        return cls(config, stages, plan)

    def new_cache(self, batch: int, max_len: int) -> PipelineCache:
        if not self.stages:
            raise InputError("this sharded engine is closed")
        return PipelineCache([stage.new_cache(batch, max_len) for stage in self.stages])

    def forward(self, ids: np.ndarray, cache: PipelineCache, attention_mask: np.ndarray | None = None,
                positions: np.ndarray | None = None, last_only: bool = False,
                trace: dict | None = None) -> np.ndarray:
        """Host logits (B, T or 1, vocab) for ids (B, T), as LlamaModel.forward; `trace` receives host arrays."""
        if not self.stages:
            raise InputError("this sharded engine is closed")
        x: Array = ids
        for stage, part in zip(self.stages, cache.parts, strict=True):
            stage_trace = None if trace is None else {}
            x = stage.run(x, part, attention_mask, positions, last_only, stage_trace)
            if trace is not None:
                trace.update({k: stage.backend.to_numpy(v) for k, v in stage_trace.items()})
        return self.stages[-1].backend.to_numpy(x)

    def close(self) -> None:
        self.stages = []


def parse_device(spec: str) -> int:
    """"cuda:N" -> N."""
    kind, _, index = str(spec).partition(":")
    if kind != "cuda" or not index.isdigit():
        raise InputError(f"device {spec!r}: stages are placed on CUDA devices, written 'cuda:0', 'cuda:1', ...")
    return int(index)


def stage_backend(name: str, dtype: str | DataType, device: int | None) -> Backend:
    """The backend a stage computes with; on a given CUDA device for the cupy backend."""
    if device is None:
        return get_backend(name, dtype)
    if name != "cupy":
        raise InputError(f"devices= places stages on CUDA devices, which needs backend='cupy', not {name!r}")
    return backend_class("cupy")(DataType.parse(dtype), device=device)


def on_device(device: int | None) -> contextlib.AbstractContextManager:
    """The CUDA device a stage's arrays live on, made current (nothing for a stage without one)."""
    if device is None:
        return contextlib.nullcontext()
    import cupy  # only a stage placed on a CUDA device gets here, with the cupy backend loaded

    return cupy.cuda.Device(device)


def plan_model(path: str | Path, config: LlamaConfig, shards: int | Sequence[int], backend: str,
               dtype: DataType) -> StagePlan:
    """The stage plan of the model at `path`: from its tensors' headers where this machine has every file, else
    (a Ray driver without the shard files) from the shapes the config implies, every weight in `dtype`."""
    try:
        weights = ModelDiagnostic.analyze_directory(path, backend, dtype).weight_info
    except CheckpointError:
        entries = [TensorEntry(name, "F32", shape, 4 * math.prod(shape), "")
                   for name, shape in expected_shapes(config).items()]
        weights = WeightInfo(entries, [], {})
    return stage_plan(config, weights, shards, backend, dtype)
