"""The request bodies the server accepts, as pydantic models, and the OpenAI error shape every rejection takes.

Bodies follow OpenAI's completions and chat completions APIs, plus the sampling fields vLLM and llama.cpp accept
(`top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`). A field refllama does not implement is rejected by
name rather than ignored: an oracle that silently dropped `logit_bias` would answer a different question. OpenAI
fields with a neutral value (`presence_penalty` 0, `best_of` 1, ...) are accepted at that value only.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# OpenAI's own bounds, kept so a client moving between servers sees the same rules.
MAX_LOGPROBS = 20
MAX_STOP = 4
MAX_N = 16


class ApiError(Exception):
    """A request the server refuses, rendered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse(model: type[BaseModel], body: bytes) -> Any:
    """The body as `model`, or ApiError(400) naming the field at fault (e.g. "messages.0.content")."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {first['msg']}") from None
        loc = first["loc"]
        # A value that fits no member of a union fails once per member, each loc ending in the member's name:
        # the field is their common prefix.
        for other in errors[1:]:
            if other["loc"][:1] == loc[:1]:
                same = itertools.takewhile(lambda ab: ab[0] == ab[1], zip(loc, other["loc"], strict=False))
                loc = tuple(a for a, _ in same)
        param = ".".join(str(part) for part in loc) or None
        message = "unknown or unsupported field" if first["type"] == "extra_forbidden" else first["msg"]
        raise ApiError(400, f"{param}: {message}" if param else message, param) from None


class _Body(BaseModel):
    """Strict types (no "5" for 5), unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


Neutral = Annotated[float, Field(ge=0, le=0)]  # presence/frequency penalties: only the neutral 0 is implemented


class _Sampling(_Body):
    """The fields completions and chat completions share."""

    model: str | None = None  # one model is served; any name is answered by it
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP)  # a single string is taken as [it]
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Neutral = 0.0
    frequency_penalty: Neutral = 0.0
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        return [] if v is None else [v] if isinstance(v, str) else v


class StreamOptions(_Body):
    include_usage: bool = False


class CompletionBody(_Sampling):
    """POST /v1/completions. `prompt`: text, a list of texts, token ids, or a list of token id lists."""

    prompt: list[str | list[int]]  # normalized by _prompts: one entry per prompt, text or token ids
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = None
    return_tokens_as_token_ids: bool = False  # vLLM's switch: tokens named "token_id:N" instead of their text

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        """Text, a list of texts, token ids, or a list of token id lists -> a list of prompts."""
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v:
            if all(isinstance(x, str) for x in v):
                return v
            if all(type(x) is int for x in v):
                return [v]
            if all(isinstance(x, list) and x and all(type(t) is int for t in x) for x in v):
                return v
        raise ValueError("must be a string, a list of strings, a non-empty list of token ids, or a list of them")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message as the chat template reads it; fields beyond role and content (name, tool_calls, ...) are passed
    to the template as given."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


class ChatBody(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokensBody(_Body):
    """POST /v1/logits and /v1/trace: one sequence, as token ids or as text (tokenized as a completions prompt)."""

    model: str | None = None
    token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    prompt: str | None = Field(None, min_length=1)
    names: list[str] | None = None  # /v1/trace: only these tensors (default: all)


_Sampling.model_rebuild()
