"""The HTTP layer: OpenAI-compatible routes, refllama's /v1/logits and /v1/trace, limits and the API key.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/logits,
POST /v1/trace. Every refusal has OpenAI's error shape, {"error": {"message", "type", "param", "code"}}, with the
field at fault in `param`. Prompts are tokenized here, before queuing, so limits are checked with the field named
and the engine thread only computes.

Logprobs are the engine's own: log-softmax in float64 of the logits in the compute dtype, serialized by Python's
`json` (the shortest text that reads back as the same float64). A prompt token's logprob (echo) is therefore
log_softmax(engine.logits(prompt))[t - 1, prompt[t]] to the last bit, and a generated token's is what
`engine.generate` reports for the request alone (refllama/serve/scheduler.py says which batches keep that).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from refllama.diagnostics.benchmark import rss_mb
from refllama.errors import InputError, RefLlamaError
from refllama.generation import GenerationRequest, GenerationResponse, TokenLogprob, decode
from refllama.serve.scheduler import Job, Scheduler
from refllama.serve.schema import ApiError, ChatBody, CompletionBody, TokensBody, parse

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # refllama's finish reasons in OpenAI's words


@dataclass
class Limits:
    """What one request may ask for; over a limit is a 400 (413 for the body, 429 for concurrency)."""

    max_prompt_tokens: int | None = None  # None: the model's context
    max_tokens: int = 4096  # per choice; also the chat default when the request names none
    max_body_bytes: int = 8 * 2**20
    max_concurrent: int = 64  # requests queued or running; more get 429
    max_rows: int = 64  # prompts x n in one request


class _Server:
    """The state the routes share: the engine, its scheduler, the limits and the count of requests in flight."""

    def __init__(self, engine: Any, model_id: str, limits: Limits, scheduler: Scheduler, api_key: str | None):
        self.engine, self.model_id, self.limits, self.scheduler = engine, model_id, limits, scheduler
        self.api_key = api_key
        self.in_flight = 0
        self.context = engine.config.max_position_embeddings
        self.max_prompt = min(limits.max_prompt_tokens or self.context, self.context)

    # --- admission ------------------------------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    async def body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it passes max_body_bytes (declared or as it arrives)."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def admit(self) -> None:
        if self.in_flight >= self.limits.max_concurrent:
            raise ApiError(429, f"the server is busy ({self.in_flight} requests in flight); retry later",
                           type="rate_limit_error", code="server_busy")
        self.in_flight += 1

    # --- prompts --------------------------------------------------------------------------------------------

    def tokens(self, prompt: str | Sequence[int], param: str) -> list[int]:
        """A prompt as token ids, within the vocabulary and the prompt limit."""
        try:
            if isinstance(prompt, str):
                if self.engine.tokenizer is None:
                    raise InputError("this model has no tokenizer: send token ids")
                ids = self.engine.tokenizer.encode(prompt)
            else:
                ids = [int(t) for t in prompt]
            if not ids:
                raise InputError("the prompt is empty")
            self.engine.check_ids(ids)
        except InputError as e:
            raise ApiError(400, f"{param}: {e}", param) from None
        if len(ids) > self.max_prompt:
            raise ApiError(400, f"{param}: the prompt has {len(ids)} tokens; at most {self.max_prompt} are allowed",
                           param, code="context_length_exceeded")
        return ids

    def check_max_tokens(self, value: int, param: str) -> int:
        if value > self.limits.max_tokens:
            raise ApiError(400, f"{param}: at most {self.limits.max_tokens} tokens per choice, got {value}", param)
        return value

    def token_text(self, token_id: int, as_ids: bool) -> str:
        tok = self.engine.tokenizer
        return f"token_id:{token_id}" if as_ids or tok is None else tok.decode([token_id])

    # --- running --------------------------------------------------------------------------------------------

    async def run(self, job: Job) -> list[GenerationResponse]:
        """Queue a job and wait for every row's response."""
        self.scheduler.submit(job)
        responses: list[GenerationResponse | None] = [None] * len(job.requests)
        try:
            while any(r is None for r in responses):
                event = await job.events.get()
                if event[0] == "error":
                    raise _engine_error(event[1])
                if event[0] == "done":
                    responses[event[1]] = event[2]
        finally:
            job.cancelled = True  # nothing more is wanted (a no-op once every row is done)
        return responses  # type: ignore[return-value]

    async def call(self, fn: Any) -> Any:
        """Run fn() on the engine thread, between batches."""
        job = Job(asyncio.get_running_loop(), call=fn)
        self.scheduler.submit(job)
        event = await job.events.get()
        if event[0] == "error":
            raise _engine_error(event[1])
        return event[1]


def _engine_error(e: BaseException) -> ApiError:
    if isinstance(e, RefLlamaError):
        return ApiError(400, str(e))
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


def _sampling(body: Any, ids: list[int], max_tokens: int, choice: int, logprobs: int | None,
              echo: bool) -> GenerationRequest:
    """A GenerationRequest for one choice. With a seed, choice j draws from seed + j, so n choices differ."""
    try:
        return GenerationRequest(
            token_ids=ids, max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
            top_p=body.top_p, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
            seed=None if body.seed is None else body.seed + choice, stop=body.stop,
            stop_token_ids=body.stop_token_ids, logprobs=logprobs, echo=echo)
    except InputError as e:
        raise ApiError(400, str(e)) from None


def _usage(prompts: Sequence[list[int]], responses: Sequence[GenerationResponse]) -> dict[str, int]:
    """Each prompt counted once (as OpenAI does with n > 1), every choice's tokens."""
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(r.token_ids) for r in responses)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(chunk: dict[str, Any] | str) -> str:
    return f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk, ensure_ascii=False)}\n\n"


async def _events(job: Job, head: list[dict], piece_chunk: Any, final_chunk: Any,
                  usage_chunk: Any) -> AsyncIterator[str]:
    """Server-sent events: the head chunks, a chunk per text piece, each row's final chunk, usage, [DONE]."""
    for chunk in head:
        yield _sse(chunk)
    responses: list[GenerationResponse | None] = [None] * len(job.requests)
    while any(r is None for r in responses):
        event = await job.events.get()
        if event[0] == "error":
            yield _sse(_engine_error(event[1]).body())
            break
        if event[0] == "text":
            yield _sse(piece_chunk(event[1], event[2]))
        else:
            responses[event[1]] = event[2]
            yield _sse(final_chunk(event[1], event[2]))
    else:
        if usage_chunk is not None:
            yield _sse(usage_chunk(responses))
    yield _sse("[DONE]")


class _EventStream(StreamingResponse):
    """A stream of a queued job that, however it ends (done, client gone, never started), cancels the job and
    frees its request slot. Starlette cancels the sending when the client disconnects; the scheduler then stops
    the batch between two tokens once no row of it is wanted."""

    def __init__(self, server: _Server, job: Job, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream")
        self.server, self.job = server, job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled = True
            self.server.in_flight -= 1


# --- routes -------------------------------------------------------------------------------------------------


async def health(request: Request) -> Response:
    server: _Server = request.app.state.server
    return JSONResponse({"status": "ok", "model": server.model_id, "in_flight": server.in_flight,
                         "rss_mb": round(rss_mb(), 1), "scheduler": vars(server.scheduler.stats)})


async def models(request: Request) -> Response:
    server: _Server = request.app.state.server
    server.check_key(request)
    return JSONResponse({"object": "list", "data": [
        {"id": server.model_id, "object": "model", "created": request.app.state.started, "owned_by": "refllama",
         "max_model_len": server.context}]})


async def completions(request: Request) -> Response:
    server: _Server = request.app.state.server
    server.check_key(request)
    body: CompletionBody = parse(CompletionBody, await server.body(request))
    prompts = body.prompt
    if len(prompts) * body.n > server.limits.max_rows:
        raise ApiError(400, f"prompt: {len(prompts)} prompts x n={body.n} is over {server.limits.max_rows} choices",
                       "prompt")
    ids = [server.tokens(p, "prompt") for p in prompts]
    max_tokens = server.check_max_tokens(16 if body.max_tokens is None else body.max_tokens, "max_tokens")
    echo_logprobs = body.echo and body.logprobs is not None  # prompt logprobs need every position's logits
    requests = [_sampling(body, p, max_tokens, j, body.logprobs, echo_logprobs) for p in ids for j in range(body.n)]
    texts = [p if isinstance(p, str) else _decode(server, p) for p in prompts]
    as_ids = body.return_tokens_as_token_ids
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def choice(row: int, text: str, response: GenerationResponse | None, final: bool) -> dict[str, Any]:
        prompt = texts[row // body.n]
        logprobs = None
        if final and body.logprobs is not None:
            logprobs = _completion_logprobs(server, response, prompt, body.echo, as_ids)
        return {"index": row, "text": text, "logprobs": logprobs,
                "finish_reason": FINISH[response.finish_reason] if final else None}

    def envelope(choices: list[dict], **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": server.model_id,
                "choices": choices, **extra}

    server.admit()
    job = Job(asyncio.get_running_loop(), requests)
    if body.stream:
        head = [envelope([{"index": row, "text": texts[row // body.n], "logprobs": None, "finish_reason": None}
                          for row in range(len(requests))])] if body.echo else []
        usage = body.stream_options is not None and body.stream_options.include_usage
        server.scheduler.submit(job)
        return _EventStream(server, job, _events(
            job, head,
            piece_chunk=lambda row, piece: envelope([choice(row, piece, None, False)]),
            final_chunk=lambda row, r: envelope([choice(row, "", r, True)]),
            usage_chunk=(lambda rs: envelope([], usage=_usage(ids, rs))) if usage else None))
    try:
        responses = await server.run(job)
    finally:
        server.in_flight -= 1
    choices = [choice(row, (texts[row // body.n] if body.echo else "") + r.text, r, True)
               for row, r in enumerate(responses)]
    return JSONResponse(envelope(choices, usage=_usage(ids, responses)))


async def chat_completions(request: Request) -> Response:
    server: _Server = request.app.state.server
    server.check_key(request)
    body: ChatBody = parse(ChatBody, await server.body(request))
    if body.n > server.limits.max_rows:
        raise ApiError(400, f"n: at most {server.limits.max_rows} choices", "n")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs set to true", "top_logprobs")
    messages = [m.as_template_input() for m in body.messages]
    try:
        prompt = decode.prompt_ids(server.engine, GenerationRequest(messages=messages))
    except InputError as e:
        raise ApiError(400, f"messages: {e}", "messages") from None
    ids = server.tokens(prompt, "messages")
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = server.check_max_tokens(server.limits.max_tokens if asked is None else asked, param)
    top = (body.top_logprobs or 0) if body.logprobs else None
    requests = [_sampling(body, ids, max_tokens, j, top, False) for j in range(body.n)]
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def logprobs(response: GenerationResponse) -> dict[str, Any] | None:
        if not body.logprobs:
            return None
        return {"content": [_chat_logprob(server, lp) for lp in response.logprobs or []]}

    def envelope(choices: list[dict], object: str = "chat.completion", **extra: Any) -> dict[str, Any]:
        return {"id": rid, "object": object, "created": created, "model": server.model_id, "choices": choices,
                **extra}

    server.admit()
    job = Job(asyncio.get_running_loop(), requests)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunk = "chat.completion.chunk"
        head = [envelope([{"index": row, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None} for row in range(body.n)], chunk)]
        server.scheduler.submit(job)
        return _EventStream(server, job, _events(
            job, head,
            piece_chunk=lambda row, piece: envelope(
                [{"index": row, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}], chunk),
            final_chunk=lambda row, r: envelope(
                [{"index": row, "delta": {}, "logprobs": logprobs(r), "finish_reason": FINISH[r.finish_reason]}],
                chunk),
            usage_chunk=(lambda rs: envelope([], chunk, usage=_usage([ids], rs))) if usage else None))
    try:
        responses = await server.run(job)
    finally:
        server.in_flight -= 1
    choices = [{"index": row, "message": {"role": "assistant", "content": r.text}, "logprobs": logprobs(r),
                "finish_reason": FINISH[r.finish_reason]} for row, r in enumerate(responses)]
    return JSONResponse(envelope(choices, usage=_usage([ids], responses)))


async def logits(request: Request) -> Response:
    """Every position's logits for one sequence, as engine.logits computes them, base64 in their own dtype."""
    server, _, ids, values = await _on_sequence(request, lambda engine, ids: engine.logits(ids))
    return JSONResponse({"object": "logits", "model": server.model_id, "token_ids": ids, **_tensor(values)})


async def trace(request: Request) -> Response:
    """Every intermediate of one forward pass (engine.trace), by name, base64 in their own dtype."""
    server, body, ids, tensors = await _on_sequence(request, lambda engine, ids: engine.trace(ids))
    names = body.names if body.names is not None else list(tensors)
    unknown = [n for n in names if n not in tensors]
    if unknown:
        raise ApiError(400, f"names: no tensor named {unknown[0]!r} (there are {len(tensors)}: "
                            f"{', '.join(list(tensors)[:6])}, ...)", "names")
    return JSONResponse({"object": "trace", "model": server.model_id, "token_ids": ids,
                         "tensors": {n: _tensor(tensors[n]) for n in names}})


async def _on_sequence(request: Request, fn: Any) -> tuple[_Server, TokensBody, list[int], Any]:
    """The checks and admission /v1/logits and /v1/trace share, then fn(engine, ids) on the engine thread."""
    server: _Server = request.app.state.server
    server.check_key(request)
    body: TokensBody = parse(TokensBody, await server.body(request))
    ids = _sequence(server, body)
    server.admit()
    try:
        result = await server.call(lambda: fn(server.engine, ids))
    finally:
        server.in_flight -= 1
    return server, body, ids, result


def _sequence(server: _Server, body: TokensBody) -> list[int]:
    if (body.token_ids is None) == (body.prompt is None):
        raise ApiError(400, "token_ids: send exactly one of token_ids or prompt", "token_ids")
    if body.token_ids is not None:
        return server.tokens(body.token_ids, "token_ids")
    return server.tokens(body.prompt, "prompt")  # type: ignore[arg-type]


def _tensor(values: np.ndarray) -> dict[str, Any]:
    """float64 stays float64; every narrower float widens exactly to float32. Little-endian, C order."""
    wide = np.dtype("<f8") if values.dtype == np.float64 else np.dtype("<f4")
    data = np.ascontiguousarray(values, dtype=wide)
    return {"shape": list(data.shape), "dtype": wide.name, "byte_order": "little",
            "data": base64.b64encode(data.tobytes()).decode("ascii")}


def _decode(server: _Server, ids: list[int]) -> str:
    tok = server.engine.tokenizer
    return "" if tok is None else tok.decode(ids)


def _completion_logprobs(server: _Server, response: GenerationResponse, prompt: str, echo: bool,
                         as_ids: bool) -> dict[str, Any]:
    """OpenAI's legacy logprobs: tokens, token_logprobs, top_logprobs ({token: logprob}) and text_offset; with
    echo the prompt's tokens come first, the first of them without a logprob (nothing predicts it)."""
    entries: list[tuple[int, TokenLogprob | None]] = []
    if echo:
        first, *rest = response.prompt_logprobs or [None]
        entries.append((response.prompt_token_ids[0], first))
        entries += [(lp.token_id, lp) for lp in rest]
    entries += [(lp.token_id, lp) for lp in response.logprobs or []]
    tokens = [server.token_text(t, as_ids) for t, _ in entries]
    offsets, at = [], 0 if echo else len(prompt)
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [None if lp is None else lp.logprob for _, lp in entries],
            "top_logprobs": [None if lp is None else {server.token_text(i, as_ids): v for i, v in lp.top}
                             for _, lp in entries],
            "text_offset": offsets}


def _chat_logprob(server: _Server, lp: TokenLogprob) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = server.token_text(token_id, False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}


# --- the application ----------------------------------------------------------------------------------------


async def _api_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, ApiError)
    return JSONResponse(e.body(), status_code=e.status)


async def _http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, HTTPException)
    return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                        status_code=e.status_code, headers=e.headers)


def create_app(engine: Any, model_id: str, *, limits: Limits | None = None, api_key: str | None = None,
               max_batch_size: int = 8, padded_batches: bool = False) -> Starlette:
    """The server for a loaded engine. Its engine thread starts and stops with the application (lifespan)."""
    scheduler = Scheduler(engine, max_batch_size=max_batch_size, padded=padded_batches)

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.close)

    app = Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/logits", logits, methods=["POST"]),
        Route("/v1/trace", trace, methods=["POST"]),
    ], exception_handlers={ApiError: _api_error, HTTPException: _http_error},
        lifespan=contextlib.asynccontextmanager(lifespan))
    app.state.server = _Server(engine, model_id, limits or Limits(), scheduler, api_key)
    app.state.started = int(time.time())
    return app
