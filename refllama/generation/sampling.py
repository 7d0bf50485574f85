"""Sampling that matches Hugging Face: the same logits processors, in the same order, then a seeded host draw.

Order, as transformers' `generate` builds it: repetition penalty, temperature, top-k, top-p, min-p. Each
processor works on one row of scores (vocab,) in the row's own dtype, step for step as transformers' does, so
that with float32 logits the kept set and the processed scores are HF's. The draw uses a NumPy Generator on the
host: the same seed and the same logits give the same tokens on every backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from refllama.errors import InputError, brief


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0/None, top_p 1, min_p 0/None and repetition_penalty 1 mean off."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty", *(("min_p",) if self.min_p is not None else ())):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {brief(value)}")
        for name in ("top_k", "min_tokens_to_keep"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, (bool, np.bool_))
                                      or not isinstance(value, (int, np.integer))):
                raise InputError(f"{name} must be an integer, got {brief(value)}")
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise InputError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens_to_keep < 1:
            raise InputError(f"min_tokens_to_keep must be >= 1, got {self.min_tokens_to_keep}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def repetition_penalty(scores: np.ndarray, previous: Sequence[int], penalty: float) -> np.ndarray:
    """Scores of tokens seen before (prompt and output): divided by penalty if positive, multiplied if negative."""
    seen = np.unique(np.asarray(previous, dtype=np.int64))
    out = scores.copy()
    s = scores[seen]
    out[seen] = np.where(s < 0, s * scores.dtype.type(penalty), s / scores.dtype.type(penalty))
    return out


def temperature(scores: np.ndarray, t: float) -> np.ndarray:
    return scores / scores.dtype.type(t)


def top_k(scores: np.ndarray, k: int, min_tokens_to_keep: int = 1) -> np.ndarray:
    """Keep tokens scoring at least the k-th highest score (ties at the boundary are kept, as in HF)."""
    k = min(max(k, min_tokens_to_keep), scores.size)
    kth = np.partition(scores, -k)[-k]
    return np.where(scores < kth, -np.inf, scores).astype(scores.dtype)


def top_p(scores: np.ndarray, p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """Nucleus: drop the least likely tokens whose cumulative probability stays within 1 - p."""
    order = np.argsort(scores, kind="stable")  # ascending, as HF sorts
    cumulative = np.cumsum(_softmax(scores[order]), dtype=scores.dtype)
    remove_sorted = cumulative <= scores.dtype.type(1 - p)
    remove_sorted[-min_tokens_to_keep:] = False
    remove = np.empty_like(remove_sorted)
    remove[order] = remove_sorted
    return np.where(remove, -np.inf, scores).astype(scores.dtype)


def min_p(scores: np.ndarray, p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """Drop tokens less likely than p times the most likely one."""
    probs = _softmax(scores)
    remove = probs < scores.dtype.type(p) * probs.max()
    keep = np.argsort(-probs, kind="stable")[:min(min_tokens_to_keep, probs.size)]
    remove[keep] = False
    return np.where(remove, -np.inf, scores).astype(scores.dtype)


def process(scores: np.ndarray, params: SamplingParams, previous: Sequence[int] = ()) -> np.ndarray:
    """Apply the processors params switches on, in HF's order, to one row of scores (vocab,)."""
    if params.repetition_penalty != 1.0 and len(previous):
        scores = repetition_penalty(scores, previous, params.repetition_penalty)
    if params.greedy:
        return scores
    if params.temperature != 1.0:
        scores = temperature(scores, params.temperature)
    if params.top_k:
        scores = top_k(scores, params.top_k, params.min_tokens_to_keep)
    if params.top_p < 1.0:
        scores = top_p(scores, params.top_p, params.min_tokens_to_keep)
    if params.min_p:
        scores = min_p(scores, params.min_p, params.min_tokens_to_keep)
    return scores


def sample(scores: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           previous: Sequence[int] = ()) -> int:
    """The next token: argmax when greedy, else one draw from softmax(processed scores)."""
    with np.errstate(all="ignore"):  # non-finite results are caught below, with the parameters named
        processed = process(scores, params, previous)
        if params.greedy:
            return int(np.argmax(processed))
        probs = _softmax(processed.astype(np.float64))
    if not np.isfinite(probs).all() or not probs.sum() > 0:
        # e.g. a temperature so small (a denormal) that the scaled logits overflow to inf
        raise InputError(f"sampling found no valid probabilities: the processed logits are not finite "
                         f"(temperature {params.temperature}, top_k {params.top_k}, top_p {params.top_p}, "
                         f"min_p {params.min_p})")
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), cdf.size - 1))


def log_softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max()
    return shifted - np.log(np.exp(shifted).sum())


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max())
    return e / e.sum()
