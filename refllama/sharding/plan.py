"""Stage plans: a model's layers split into contiguous spans, one per pipeline stage, balanced by bytes.

Splitting by layers keeps each stage's arithmetic exactly that of one device: the residual stream handed from stage
to stage is the same array, so a pipeline's logits equal the unsharded engine's bit for bit. The first stage also
holds the embedding table, the last the final norm and the head (and the embedding table again when the head is
tied to it); balancing puts fewer layers on the stages that carry those.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from refllama.errors import InputError
from refllama.model.weights import StageSpan


@dataclass(frozen=True)
class StagePlan:
    """Stage s runs layers [bounds[s], bounds[s + 1]); the byte figures are predictions (diagnostics.memory)."""

    bounds: tuple[int, ...]  # (0, ..., num_layers)
    weight_bytes: tuple[int, ...]  # each stage's weights as loaded
    memory_bytes: tuple[int, ...]  # weights + its layers' KV cache + activations + overhead: what its node needs
    files: tuple[tuple[str, ...], ...] = ()  # the weight files each stage reads (empty where not known)

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def spans(self) -> list[StageSpan]:
        return spans(self.bounds)

    def to_json(self) -> dict:
        files = self.files or ((),) * self.num_stages
        return {"bounds": list(self.bounds),
                "stages": [{"layers": [s.first, s.last], "weight_bytes": w, "memory_bytes": m, "files": list(f)}
                           for s, w, m, f in zip(self.spans, self.weight_bytes, self.memory_bytes, files,
                                                 strict=True)]}


def spans(bounds: Sequence[int]) -> list[StageSpan]:
    """The StageSpan of each stage of a (checked) bounds tuple."""
    last = len(bounds) - 2
    return [StageSpan(bounds[s], bounds[s + 1], embeds=s == 0, head=s == last) for s in range(last + 1)]


def check_bounds(bounds: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Explicit split points [0, ..., num_layers], strictly increasing (every stage runs at least one layer)."""
    b = tuple(int(x) for x in bounds)
    if len(b) < 2 or b[0] != 0 or b[-1] != num_layers or any(x >= y for x, y in itertools.pairwise(b)):
        raise InputError(f"shards={list(bounds)}: split points must rise strictly from 0 to the model's "
                         f"{num_layers} layers, e.g. [0, {num_layers // 2}, {num_layers}]")
    return b


def balance(layer_cost: Sequence[int], first_extra: int, last_extra: int, stages: int) -> tuple[int, ...]:
    """Bounds of `stages` contiguous spans minimising the largest stage's cost (the sum of its layers' costs, plus
    `first_extra` on the first stage and `last_extra` on the last); at least one layer per stage.

    Dynamic programming over (stage, end layer), vectorised over the start layer: instant for any real model.
    """
    n = len(layer_cost)
    if not 1 <= stages <= n:
        raise InputError(f"cannot split {n} layers into {stages} stages (one layer per stage at most {n})")
    prefix = np.concatenate([[0], np.cumsum(np.asarray(layer_cost, dtype=np.float64))])
    # best[s, b]: the smallest largest-stage cost of layers [0, b) in stages 0..s; cut[s, b]: where stage s starts
    best = np.full((stages, n + 1), np.inf)
    cut = np.zeros((stages, n + 1), dtype=np.int64)
    best[0, 1:] = prefix[1:] + first_extra + (last_extra if stages == 1 else 0)
    for s in range(1, stages):
        extra = last_extra if s == stages - 1 else 0
        for b in range(s + 1, n + 1):
            starts = np.arange(s, b)
            value = np.maximum(best[s - 1, starts], prefix[b] - prefix[starts] + extra)
            k = int(np.argmin(value))  # the first of equal optima: deterministic
            best[s, b], cut[s, b] = value[k], starts[k]
    bounds, b = [n], n
    for s in range(stages - 1, 0, -1):
        b = int(cut[s, b])
        bounds.append(b)
    return (0, *reversed(bounds))


def fewest_stages(layer_cost: Sequence[int], first_extra: int, last_extra: int,
                  fits: Callable[[tuple[int, ...]], bool]) -> tuple[int, ...] | None:
    """The balanced bounds of the fewest stages for which `fits(bounds)` holds (None if not even one layer per
    stage fits). The largest stage shrinks as stages are added, so a binary search over the count finds it."""
    lo, hi = 1, len(layer_cost)
    if not fits(balance(layer_cost, first_extra, last_extra, hi)):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(balance(layer_cost, first_extra, last_extra, mid)) else (mid + 1, hi)
    return balance(layer_cost, first_extra, last_extra, lo)
