"""The decode loop, once: greedy ids, sampled requests, padded batches, streaming and the benchmark all run
`forward_steps`.

It needs only a narrow handle on a model (`Model`: forward, new_cache, check_ids, config, tokenizer), which the
engine is; nothing here imports the engine. One loop serves a single request and a padded batch. A batch is left-
padded: each row's real tokens sit at the right, padded slots are masked out of attention and every row has its own
positions, so a row computes what it would alone. Sampling happens on the host, per row, from that row's own seeded
NumPy Generator.

Stopping, per row: an id in the model's eos set (config.json and generation_config.json) -> "eos"; a stop string
(found in the decoded text even when split across tokens, and trimmed from it) or an extra stop id -> "stop";
max_new_tokens or the context limit (max_position_embeddings) -> "length".
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from typing import Any, Protocol

import numpy as np

from refllama.config import LlamaConfig
from refllama.errors import InputError, NumericalError, brief
from refllama.formats.finite import first_nonfinite
from refllama.generation.requests import GenerationRequest, GenerationResponse, Timings, TokenLogprob, Usage
from refllama.generation.sampling import log_softmax, sample


class Model(Protocol):
    """What generation needs of a loaded model (GenericLlamaEngine is one)."""

    config: LlamaConfig
    tokenizer: Any  # a LlamaTokenizer, or None for a model without tokenizer files

    def forward(self, token_ids: np.ndarray, cache: Any, attention_mask: np.ndarray | None = None,
                positions: np.ndarray | None = None, last_only: bool = False) -> np.ndarray: ...

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> Any: ...

    def check_ids(self, token_ids: Any, ndim: int = 1) -> np.ndarray: ...

    def trace(self, token_ids: Any) -> dict[str, np.ndarray]: ...


def forward_steps(model: Model, ids: np.ndarray, max_new_tokens: int, attention_mask: np.ndarray | None = None,
                  positions: np.ndarray | None = None,
                  all_logits: bool = False) -> Generator[np.ndarray, np.ndarray, None]:
    """The decode loop's forward passes: a prefill of ids (B, L), then one step per token the caller sends.

    Yields host logits: first the prefill's, (B, L, vocab) with `all_logits` else (B, 1, vocab); then, for each
    array of next tokens (B,) sent in, that step's (B, 1, vocab). The KV cache holds L + max_new_tokens slots.
    attention_mask (B, L) and positions (B, L) describe a left-padded batch (None: no padding).
    Logits that are NaN or infinite raise NumericalError naming the first layer that produced them.
    """
    B, L = ids.shape
    cache = model.new_cache(B, L + max_new_tokens)
    logits = model.forward(ids, cache, attention_mask=attention_mask, positions=positions, last_only=not all_logits)
    next_positions = None if positions is None else positions[:, -1] + 1
    sent: list[np.ndarray] = []
    prompt_mask = attention_mask
    while True:
        check_finite(model, logits, lambda b: _row_ids(ids, prompt_mask, sent, b))
        tokens = np.asarray((yield logits), dtype=np.int64).reshape(B)
        sent.append(tokens)
        if attention_mask is not None:
            attention_mask = np.concatenate([attention_mask, np.ones((B, 1), dtype=attention_mask.dtype)], axis=1)
        step_positions = None if next_positions is None else next_positions[:, None]
        logits = model.forward(tokens.reshape(B, 1), cache, attention_mask=attention_mask, positions=step_positions)
        if next_positions is not None:
            next_positions = next_positions + 1


def check_finite(model: Model, logits: np.ndarray, row_ids: Any) -> None:
    """NumericalError when a row's logits hold a NaN or an Inf, naming the first intermediate of a forward pass over
    that row's tokens (`row_ids(b)`) where non-finite values appear (refllama/formats/finite.py)."""
    finite = np.isfinite(logits).reshape(logits.shape[0], -1).all(axis=1)
    if finite.all():
        return
    b = int(np.flatnonzero(~finite)[0])
    tokens = row_ids(b)
    where = first_nonfinite(model.trace(tokens))
    found = f"the first non-finite values appear in {where}" if where else "the trace stays finite"
    raise NumericalError(f"the logits of row {b} after {len(tokens)} tokens are NaN or infinite; {found} "
                         "(engine.trace names every intermediate)")


def _row_ids(ids: np.ndarray, mask: np.ndarray | None, sent: list[np.ndarray], b: int) -> np.ndarray:
    """Row b's real tokens so far: its prompt without padding, then the tokens generated for it."""
    prompt = ids[b] if mask is None else ids[b][mask[b] != 0]
    return np.concatenate([prompt, [int(t[b]) for t in sent]]).astype(np.int64)


def check_max_new_tokens(value: Any) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {brief(value)}")


def greedy(model: Model, ids: np.ndarray, max_new_tokens: int, stop_ids: set[int] = frozenset(),
           on_first: Any = None) -> list[int]:
    """Greedy continuation of one sequence ids (L,): up to max_new_tokens ids (and never past the context),
    ending early with a stop id.
    `on_first()`, if given, is called once the first new token is chosen (the time to first token)."""
    check_max_new_tokens(max_new_tokens)
    limit = model.config.max_position_embeddings
    if len(ids) >= limit:
        raise InputError(f"the prompt has {len(ids)} tokens; the model's context is {limit}, so no token can follow")
    max_new_tokens = min(max_new_tokens, limit - len(ids))  # never past the context, as generate()
    if max_new_tokens == 0:
        return []
    steps = forward_steps(model, np.asarray(ids)[None, :], max_new_tokens)
    logits = next(steps)  # the prefill
    new: list[int] = []
    while True:
        token = int(np.argmax(logits[0, -1]))
        new.append(token)
        if on_first is not None and len(new) == 1:
            on_first()
        if len(new) == max_new_tokens or token in stop_ids:
            return new
        logits = steps.send(np.array([token]))  # decode one step


def prompt_ids(engine: Model, request: GenerationRequest) -> list[int]:
    """The request's prompt as token ids (chat template applied, BOS as the tokenizer's files say, never twice)."""
    given = [x is not None for x in (request.prompt, request.messages, request.token_ids)]
    if sum(given) != 1:
        raise InputError("a request needs exactly one of prompt, messages or token_ids")
    if request.token_ids is not None:
        ids = [int(t) for t in request.token_ids]
    else:
        tok = engine.tokenizer
        if tok is None:
            raise InputError("this model has no tokenizer files: pass token_ids instead of text")
        if request.messages is not None:
            if not tok.chat_template:
                raise InputError("this model has no chat template: pass a prompt instead of messages")
            from refllama.generation.chat import render_chat_template  # jinja2: only for chat prompts

            text = render_chat_template(tok.chat_template, request.messages,
                                        add_generation_prompt=request.add_generation_prompt,
                                        bos_token=tok.bos_token, eos_token=tok.eos_token)
            ids = tok.encode(text, add_special_tokens=False)  # the template wrote its special tokens
        else:
            ids = tok.encode(request.prompt)
    if not ids:
        raise InputError("the prompt is empty")
    engine.check_ids(ids)
    return ids


class _Row:
    """One request's state while the batch decodes."""

    def __init__(self, engine: Model, request: GenerationRequest, ids: list[int], limit: int):
        self.request, self.prompt = request, ids
        self.params = request.sampling
        self.rng = np.random.default_rng(request.seed)
        self.budget = min(request.max_new_tokens, limit - len(ids))  # never past the context limit
        self.eos = set(engine.config.eos_token_id)
        self.stop_ids = set(request.stop_token_ids)
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text = ""
        self.finish: str | None = None if self.budget > 0 else "length"
        self.decoder = _TextDecoder(engine, request.stop)

    def step(self, logits: np.ndarray) -> None:
        """Choose the next token from this row's last logits and update text and stopping state."""
        token = sample(logits, self.params, self.rng, previous=[*self.prompt, *self.tokens])
        self.tokens.append(token)
        if self.request.logprobs is not None:
            self.logprobs.append(_logprob(logits, token, self.request.logprobs))
        stopped = self.decoder.feed(token)
        if token in self.eos:
            self.finish = "eos"
        elif stopped or token in self.stop_ids:
            self.finish = "stop"
        elif len(self.tokens) >= self.budget:
            self.finish = "length"


class _TextDecoder:
    """Incremental detokenization with stop strings.

    Text is decoded from all tokens so far (so multi-byte characters split across tokens come out whole);
    `emit()` returns only text that is final: not the tail of an incomplete UTF-8 character (U+FFFD) and not a
    suffix that could still grow into a stop string.
    """

    def __init__(self, engine: Model, stop: Sequence[str]):
        self.tokenizer, self.stop = engine.tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, token: int) -> bool:
        """Add a token; True when a stop string completed (the text is then cut before it)."""
        if self.tokenizer is None:
            return False
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        return self.stopped

    def emit(self, final: bool = False) -> str:
        end = len(self.text)
        if not final and not self.stopped:
            if self.text.endswith("\ufffd"):
                end = len(self.text.rstrip("\ufffd"))
            for s in self.stop:  # hold back a suffix that is a prefix of a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text[end - k:end] == s[:k]:
                        end = min(end, end - k)
                        break
        piece = self.text[self.emitted:max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return piece


def _logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    lp = log_softmax(logits.astype(np.float64))
    best = np.argsort(-lp, kind="stable")[:top] if top else []
    return TokenLogprob(int(token), float(lp[token]), [(int(i), float(lp[i])) for i in best])


def run(engine: Model, requests: Sequence[GenerationRequest]) -> list[GenerationResponse]:
    """Generate for a batch of requests as one padded batch."""
    steps = _steps(engine, requests)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def stream(engine: Model, request: GenerationRequest) -> Generator[str, None, GenerationResponse]:
    """Text pieces as tokens arrive; they concatenate to exactly the final response text. The generator's return
    value (StopIteration.value) is the GenerationResponse, with its timings."""
    steps = _steps(engine, [request])
    while True:
        try:
            _, piece = next(steps)
        except StopIteration as done:
            return done.value[0]
        if piece:
            yield piece


def steps(engine: Model,
          requests: Sequence[GenerationRequest]) -> Generator[tuple[int, str], None, list[GenerationResponse]]:
    """One padded batch as it decodes, for a caller that interleaves batches or gives up on one (the HTTP server):
    yields (row, new final text) after each token and returns the responses; closing it stops the batch."""
    return _steps(engine, requests)


def _steps(engine: Model,
           requests: Sequence[GenerationRequest]) -> Generator[tuple[int, str], None, list[GenerationResponse]]:
    """The decode loop: yields (row, new final text) after each token, returns the responses."""
    limit = engine.config.max_position_embeddings
    for r in requests:
        r.validate()  # fields may have changed since the request was made
    prompts = [prompt_ids(engine, r) for r in requests]
    for ids in prompts:
        if len(ids) > limit:
            raise InputError(f"the prompt has {len(ids)} tokens; the model's context is {limit}")
    rows = [_Row(engine, r, ids, limit) for r, ids in zip(requests, prompts, strict=True)]
    B, L = len(rows), max(len(ids) for ids in prompts)

    ids = np.zeros((B, L), dtype=np.int64)  # left padding; padded slots are masked, their ids never matter
    mask = np.zeros((B, L), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):], mask[b, L - len(p):] = p, 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # (B, L): each row counts from its first real token

    t0 = time.perf_counter()
    echo = any(r.echo for r in requests)  # prompt logprobs need every position's logits, else the last suffices
    steps = forward_steps(engine, ids, max(row.budget for row in rows), mask, positions, all_logits=echo)
    logits = next(steps)  # the prefill
    prefill = time.perf_counter() - t0
    prompt_logprobs = [_prompt_logprobs(logits[b, L - len(p):], p, r) if r.echo else None
                       for b, (p, r) in enumerate(zip(prompts, requests, strict=True))]
    last = logits[:, -1]  # (B, vocab)
    t1 = time.perf_counter()
    while True:
        for b, row in enumerate(rows):
            if row.finish is None:
                row.step(last[b])
                yield b, row.decoder.emit(final=row.finish is not None)
        if all(row.finish is not None for row in rows):
            break
        last = steps.send(np.array([row.tokens[-1] if row.tokens else 0 for row in rows]))[:, -1]
    decode = time.perf_counter() - t1

    timings = Timings(prefill, decode, sum(len(p) for p in prompts), sum(max(len(r.tokens) - 1, 0) for r in rows))
    return [GenerationResponse(
        text=row.decoder.text, token_ids=row.tokens, finish_reason=row.finish or "length",
        usage=Usage(len(p), len(row.tokens)), timings=timings, prompt_token_ids=p,
        logprobs=row.logprobs if row.request.logprobs is not None else None, prompt_logprobs=plp,
    ) for row, p, plp in zip(rows, prompts, prompt_logprobs, strict=True)]


def _prompt_logprobs(logits: np.ndarray, ids: list[int], request: GenerationRequest) -> list[TokenLogprob | None]:
    """Logprob of each prompt token given the ones before it (the first has no prediction)."""
    top = request.logprobs or 0
    return [None] + [_logprob(logits[t - 1], ids[t], top) for t in range(1, len(ids))]
