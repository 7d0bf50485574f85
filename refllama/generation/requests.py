"""What a caller asks of generation and what it gets back: plain dataclasses (the spec's GenerationRequest and
GenerationResponse)."""

from __future__ import annotations

from dataclasses import dataclass, field

from refllama.generation.chat import Message
from refllama.generation.sampling import SamplingParams


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

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)


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
