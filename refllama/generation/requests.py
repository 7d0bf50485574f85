"""What a caller asks of generation and what it gets back: plain dataclasses (the spec's GenerationRequest and
GenerationResponse)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refllama.errors import InputError, brief
from refllama.generation.sampling import SamplingParams

Message = dict[str, Any]  # one chat turn: {"role": "user", "content": "..."} (rendered by generation/chat.py)


@dataclass
class GenerationRequest:
    """What to generate from: exactly one of `prompt` (text), `messages` (chat) or `token_ids`."""

    prompt: str | None = None
    messages: list[Message] | None = None
    token_ids: list[int] | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # None: none; N: each generated token's logprob and the top N alternatives
    echo: bool = False  # also return the prompt tokens' logprobs
    add_generation_prompt: bool = True  # chat: end the prompt with the assistant's turn header

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # one stop string, not its characters
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """InputError naming the first field of the wrong type or out of range (generation calls this again)."""
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InputError(f"prompt must be a str, got {type(self.prompt).__name__}")
        if self.messages is not None and not (isinstance(self.messages, list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in self.messages)):
            raise InputError("messages must be a list of {'role': str, 'content': ...} dicts")
        if self.token_ids is not None:
            _check_ids("token_ids", self.token_ids)
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be an integer >= 0, got {brief(self.max_new_tokens)}")
        self.sampling  # noqa: B018  (SamplingParams checks temperature, top_k, top_p, min_p, repetition_penalty)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 1 << 128):
            raise InputError(f"seed must be None or an integer in [0, 2^128), got {brief(self.seed)}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise InputError(f"stop must be a str or a list of str, got {brief(self.stop)}")
        _check_ids("stop_token_ids", self.stop_token_ids)
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise InputError(f"logprobs must be None or an integer >= 0, got {brief(self.logprobs)}")
        for name in ("echo", "add_generation_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {brief(getattr(self, name))}")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_ids(name: str, ids: Any) -> None:
    """Token ids: a list (or tuple, or 1-d integer array) of integers; floats are refused, never truncated."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise InputError(f"{name} must be a 1-d array of integers, got {ids.dtype} of shape {ids.shape}")
        return
    if not isinstance(ids, (list, tuple)) or not all(_is_int(t) for t in ids):
        bad = next((t for t in ids if not _is_int(t)), ids) if isinstance(ids, (list, tuple)) else ids
        raise InputError(f"{name} must be a list of integers, got {brief(bad)} ({type(bad).__name__})")


@dataclass
class TokenLogprob:
    """log p(token | everything before it) under the model (log-softmax of the raw logits, before sampling
    processors), with the `top` most likely alternatives as (token id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens: int
    decode_tokens: int

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else float("inf")

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else float("inf")


@dataclass
class GenerationResponse:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    usage: Usage
    timings: Timings
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # None for the first prompt token

    def __str__(self) -> str:
        return self.text
