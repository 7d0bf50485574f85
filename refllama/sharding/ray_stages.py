"""Pipeline stages as Ray actors: one actor per stage, on whichever node Ray places it.

Each actor loads its own span from the model path on its node (only its shard files need be there) and keeps the KV
caches of its layers. The driver holds the tokenizer and does the sampling; a forward call chains the stages'
`run` tasks, each handed the previous stage's output by reference, so the residual stream goes from actor to actor
(through Ray's object store) and only the last stage's logits come back to the driver. The arithmetic is the
in-process stage's (stages.py): bit-identical to one device.

Faults: the driver waits for each stage in turn at most `timeout` seconds; a stage that died (its process killed,
its node lost), raised, or did not answer in time raises StageError naming the stage and its layers, and the
pipeline refuses further work. `close()` kills the actors (and shuts down a Ray this pipeline started).
"""

from __future__ import annotations

import itertools
import os
import re
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError

from refllama.config import LlamaConfig
from refllama.diagnostics.benchmark import peak_rss_mb, reset_peak_rss, rss_mb
from refllama.dtypes import DataType
from refllama.errors import InputError, RefLlamaError, StageError
from refllama.model.weights import StageSpan
from refllama.sharding.plan import StagePlan
from refllama.sharding.stages import Stage

# Where Ray places the stage actors: spread over the nodes, sharing the CPUs. Ray gives an actor with num_cpus=0 one
# BLAS thread (OMP_NUM_THREADS=1); ray_actor_options={"num_cpus": N} gives it N.
ACTOR_OPTIONS = {"num_cpus": 0, "scheduling_strategy": "SPREAD", "max_restarts": 0}
# Seconds a stage may take to start and load its weights (a 70B stage reads ~100 GB) when the per-call timeout
# is shorter.
LOAD_TIMEOUT = 1800.0


def stage_options(stage: int, actor_options: dict[str, Any] | None, cluster_resources: dict[str, float]) -> dict:
    """Ray options of stage `stage`'s actor: ACTOR_OPTIONS updated by `actor_options`; where the cluster has a
    custom resource `refllama_stage_<stage>` (`ray start --resources='{"refllama_stage_0": 1}'`), the actor asks for
    it, so the stage runs on the node that declared it (the node holding its shard files)."""
    options = {**ACTOR_OPTIONS, **(actor_options or {})}
    pin = f"refllama_stage_{stage}"
    if pin in cluster_resources:
        options["resources"] = {**options.get("resources", {}), pin: 1}
    return options


class StageServer:
    """One pipeline stage inside a Ray actor process."""

    def __init__(self, path: str, span: StageSpan, backend: str, dtype: str, options: dict[str, Any]):
        self.rss_before_load_mb = rss_mb()  # the worker with its imports, before any weight is read
        reset_peak_rss()
        self.stage = Stage.load(path, span, backend, dtype, **options)
        self.load_peak_rss_mb = peak_rss_mb()
        self.caches: dict[int, Any] = {}

    def info(self) -> dict[str, Any]:
        """Where this stage runs and the memory it took: peak RSS growth over the process before loading (MiB)."""
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "rss_before_load_mb": self.rss_before_load_mb, "load_peak_rss_mb": self.load_peak_rss_mb,
                "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}

    def new_cache(self, key: int, batch: int, max_len: int) -> None:
        self.caches[key] = self.stage.new_cache(batch, max_len)

    def drop_cache(self, key: int) -> None:
        self.caches.pop(key, None)

    def run(self, key: int, x: np.ndarray, attention_mask: np.ndarray | None, positions: np.ndarray | None,
            last_only: bool, with_trace: bool) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """Stage.run on host arrays: ids or the residual stream in, the residual stream or logits out."""
        trace: dict | None = {} if with_trace else None
        out = self.stage.run(x, self.caches[key], attention_mask, positions, last_only, trace)
        host = self.stage.backend.to_numpy
        return host(out), None if trace is None else {k: host(v) for k, v in trace.items()}


class RayCache:
    """A KV cache that lives in the stage actors, one part per stage, under `key`; dropped there when this handle
    is garbage collected."""

    def __init__(self, key: int, batch: int, max_len: int, actors: list[Any]):
        self.key, self.batch, self.max_len, self.length = key, batch, max_len, 0
        weakref.finalize(self, _drop_cache, list(actors), key)


def _drop_cache(actors: list[Any], key: int) -> None:
    for actor in actors:
        try:
            actor.drop_cache.remote(key)
        except Exception:  # the actor, or Ray itself, is gone already: nothing is left to free
            pass


class RayPipeline:
    """The stages of a plan as Ray actors, driven from this process."""

    def __init__(self, config: LlamaConfig, plan: StagePlan, actors: list[Any], timeout: float, owns_ray: bool):
        self.config, self.plan, self.actors, self.timeout = config, plan, actors, timeout
        self.owns_ray = owns_ray  # this pipeline started (or connected) Ray in this process: close() shuts it down
        self.broken: StageError | None = None
        self.keys = itertools.count()

    @classmethod
    def start(cls, path: str | Path, config: LlamaConfig, plan: StagePlan, backend: str, dtype: str | DataType,
              *, address: str | None = None, num_cpus: int | None = None, timeout: float = 600.0,
              actor_options: dict[str, Any] | None = None, **options: Any) -> RayPipeline:
        """Start one actor per stage and wait (each at most LOAD_TIMEOUT s, or `timeout` if longer) until every
        stage has loaded; `timeout` then bounds each stage's part of every call.

        Ray: the running one in this process, else the cluster at `address` or RAY_ADDRESS, else a local one
        with `num_cpus` CPUs. `options` (dequantize, quant_semantics) go to each Stage.load; `actor_options`
        replace ACTOR_OPTIONS' entries (e.g. {"num_gpus": 1} for a GPU per stage)."""
        owns_ray = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            owns_ray = True
        server = ray.remote(StageServer)
        resources = ray.cluster_resources()
        where = str(Path(path).expanduser().absolute())  # the same path on every node
        actors = [server.options(**stage_options(s, actor_options, resources)).remote(
                      where, span, backend, DataType.parse(dtype).value, options)
                  for s, span in enumerate(plan.spans)]
        pipeline = cls(config, plan, actors, timeout, owns_ray)
        try:
            pipeline.info(max(timeout, LOAD_TIMEOUT))
        except StageError:
            pipeline.close()
            raise
        return pipeline

    def info(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Each stage's process id, node, and memory (StageServer.info)."""
        return self._collect([actor.info.remote() for actor in self.actors], every=True, timeout=timeout)

    def new_cache(self, batch: int, max_len: int) -> RayCache:
        self._check()
        cache = RayCache(next(self.keys), batch, max_len, self.actors)
        for actor in self.actors:  # an actor runs its calls in order: the cache exists before the first run
            actor.new_cache.remote(cache.key, batch, max_len)
        return cache

    def forward(self, ids: np.ndarray, cache: RayCache, attention_mask: np.ndarray | None = None,
                positions: np.ndarray | None = None, last_only: bool = False,
                trace: dict | None = None) -> np.ndarray:
        """Host logits (B, T or 1, vocab) for ids (B, T), as LlamaModel.forward; `trace` receives host arrays."""
        self._check()
        x, outputs, traces = ids, [], []
        for actor in self.actors:
            x, stage_trace = actor.run.options(num_returns=2).remote(cache.key, x, attention_mask, positions,
                                                                   last_only, trace is not None)
            outputs.append(x)
            traces.append(stage_trace)
        logits = self._collect(outputs)
        cache.length += ids.shape[1]
        if trace is not None:
            for part in self._collect(traces, every=True):
                trace.update(part)
        return logits

    def close(self) -> None:
        """Kill every stage actor (their processes end) and shut down a Ray this pipeline started."""
        if not ray.is_initialized():
            return
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.owns_ray:
            ray.shutdown()

    # --- waiting, with faults named by stage --------------------------------------------------------------------

    def _check(self) -> None:
        if not self.actors:
            raise InputError("this sharded engine is closed")
        if self.broken is not None:
            raise StageError(self.broken.stage, self.broken.layers,
                             f"the pipeline stopped after an earlier failure ({self.broken}); close and reload it")

    def _collect(self, refs: Sequence[Any], every: bool = False, timeout: float | None = None) -> Any:
        """Wait for stage s's result refs[s], s = 0, 1, ..., each at most `timeout` seconds (default: the
        pipeline's) from the one before; the last one's value (every: all of them)."""
        timeout = self.timeout if timeout is None else timeout
        for s, ref in enumerate(refs):
            ready, _ = ray.wait([ref], timeout=timeout, fetch_local=False)
            if not ready:
                raise self._fail(s, f"did not answer within {timeout:g} s")
        try:
            return ray.get(list(refs)) if every else ray.get(refs[-1])
        except RayError as e:
            s, error = next(((s, err) for s, err in enumerate(map(_error, refs)) if err is not None),
                            (len(refs) - 1, e))
            cause = error.cause if isinstance(error, RayTaskError) else None
            if isinstance(cause, RefLlamaError):
                raise cause from None  # bad input (a full KV cache, ...): the stages are still consistent
            raise self._fail(s, _describe(error)) from None

    def _fail(self, stage: int, message: str) -> StageError:
        span = self.plan.spans[stage]
        self.broken = StageError(stage, span.layers, message)
        return self.broken


def _error(ref: Any) -> RayError | None:
    """The error a finished stage result holds, None for a value or a result still pending."""
    try:
        ray.get(ref, timeout=0)
    except GetTimeoutError:
        return None
    except RayError as e:
        return e
    return None


def _describe(error: RayError) -> str:
    """The error's kind and first line, without the terminal colours Ray puts in task names."""
    cause = error.cause if isinstance(error, RayTaskError) and error.cause is not None else error
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"[:300]
