"""`refllama serve` against live servers on 127.0.0.1, through the official openai client.

Time: the tiny-fixture tests take about 12 s; the four SmolLM2 tests are bound by its decode speed (the whole file
took 158 s on a two-core machine shared at load average 14, nearly all of it in SmolLM2 decoding).

Servers run in this process, on a thread each, on a free port. The tiny fixture carries most tests (token-id
prompts, no tokenizer); SmolLM2 is used where its tokenizer and chat template matter. Every number the server
returns is compared with the engine's own result (for the tiny fixture, from an engine loaded separately from the
same files; SmolLM2 is loaded once and its server is idle while the test asks the engine): bit for bit (==) where
the server's promise is "the engine's number", never with a tolerance except for --padded-batches, whose promise
is the engine's batch tolerance.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402

import refllama  # noqa: E402
from refllama import GenerationRequest  # noqa: E402
from refllama.serve import Limits, create_app  # noqa: E402
from refllama.serve.scheduler import Job, Scheduler  # noqa: E402

from conftest import FIXTURES, ROOT, smollm2_path  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
from serve_load import request_body, run_load  # noqa: E402

TINY = FIXTURES / "tinyllama"


@dataclass
class Live:
    url: str
    client: openai.OpenAI
    engine: refllama.GenericLlamaEngine  # the server's engine (tests compare with a separately loaded one)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()

    def post(self, path: str, body: object, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", content=body if isinstance(body, bytes) else json.dumps(body), **kw)


@pytest.fixture(scope="session")
def live() -> Iterator:
    """live(engine, name, **create_app options): a server started once per distinct call, stopped at the end."""
    servers: dict[tuple, Live] = {}
    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(engine, name: str, **options) -> Live:
        key = (id(engine), name, repr(sorted(options.items())))
        if key not in servers:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            server = uvicorn.Server(uvicorn.Config(create_app(engine, name, **options), log_level="warning"))
            thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
            thread.start()
            deadline = time.monotonic() + 20
            while not server.started:
                assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.01)
            url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            key_ = options.get("api_key") or "none"
            servers[key] = Live(url, openai.OpenAI(base_url=f"{url}/v1", api_key=key_, max_retries=0), engine)
            running.append((server, thread))
        return servers[key]

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def tiny():
    """The tiny fixture, per dtype: (server's engine, reference engine loaded separately)."""
    loaded: dict[str, tuple] = {}

    def get(dtype: str = "float32"):
        if dtype not in loaded:
            loaded[dtype] = refllama.load(TINY, dtype=dtype), refllama.load(TINY, dtype=dtype)
        return loaded[dtype]

    return get


@pytest.fixture(scope="session")
def smollm2():
    return refllama.load(smollm2_path())


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """The engine's logprob arithmetic (refllama/generation/decode.py), row by row: float64 log-softmax."""
    x = logits.astype(np.float64)
    out = np.empty_like(x)
    for t, row in enumerate(x):
        shifted = row - row.max()
        out[t] = shifted - np.log(np.exp(shifted).sum())
    return out


# --- logprobs: the engine's, to the last bit ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_echo_logprobs_equal_engine_logits_bit_for_bit(live, tiny, dtype):
    """lm-evaluation-harness's loglikelihood request (echo, max_tokens 1, logprobs 1, a batch of token-id prompts
    of different lengths): every prompt token's logprob and top alternative is log_softmax(engine.logits)."""
    engine, reference = tiny(dtype)
    server = live(engine, "tiny")
    prompts = [[1, 5, 9, 20, 33, 7], [1, 60, 2, 44], [1, 5, 9, 20, 33, 8, 13, 21, 34]]
    r = server.client.completions.create(model="tiny", prompt=prompts, max_tokens=1, echo=True, logprobs=1,
                                         temperature=0, seed=1234)
    assert len(r.choices) == 3
    for choice, ids in zip(sorted(r.choices, key=lambda c: c.index), prompts, strict=True):
        lp = choice.logprobs
        expected = log_softmax_rows(reference.logits(ids))
        assert lp.tokens[:len(ids)] == [f"token_id:{t}" for t in ids] and lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == [expected[t - 1, ids[t]] for t in range(1, len(ids))]
        best = [int(np.argmax(expected[t - 1])) for t in range(1, len(ids))]
        assert lp.top_logprobs[1:len(ids)] == [{f"token_id:{b}": expected[t, b]} for t, b in enumerate(best)]
        assert len(lp.tokens) == len(ids) + 1 and choice.finish_reason == "length"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_generated_logprobs_equal_the_engines_bit_for_bit(live, tiny, dtype):
    engine, reference = tiny(dtype)
    server = live(engine, "tiny")
    for echo, temperature in ((False, 0.0), (True, 0.0), (False, 0.9)):
        r = server.client.completions.create(model="tiny", prompt=[1, 7, 3, 11, 40], max_tokens=6, echo=echo,
                                             logprobs=3, temperature=temperature, seed=7)
        want = reference.generate(GenerationRequest(token_ids=[1, 7, 3, 11, 40], max_new_tokens=6, logprobs=3,
                                                    echo=echo, temperature=temperature, seed=7))
        lp = r.choices[0].logprobs
        skip = 5 if echo else 0
        assert lp.tokens[skip:] == [f"token_id:{t}" for t in want.token_ids]
        assert lp.token_logprobs[skip:] == [x.logprob for x in want.logprobs]
        assert lp.top_logprobs[skip:] == [{f"token_id:{i}": v for i, v in x.top} for x in want.logprobs]
        assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == len(want.token_ids)


def test_logits_endpoint_is_engine_logits(live, tiny):
    for dtype in ("float32", "float64"):
        engine, reference = tiny(dtype)
        body = live(engine, "tiny").post("/v1/logits", {"token_ids": [1, 4, 9, 16, 25]}).json()
        assert body["dtype"] == dtype and body["shape"] == [5, 64] and body["byte_order"] == "little"
        got = np.frombuffer(base64.b64decode(body["data"]), dtype=np.dtype(dtype).newbyteorder("<")).reshape(5, 64)
        np.testing.assert_array_equal(got, reference.logits([1, 4, 9, 16, 25]))


def test_trace_endpoint_is_engine_trace(live, tiny):
    engine, reference = tiny()
    server = live(engine, "tiny")
    body = server.post("/v1/trace", {"token_ids": [1, 2, 3], "names": ["layers.1.q", "logits"]}).json()
    want = reference.trace([1, 2, 3])
    assert set(body["tensors"]) == {"layers.1.q", "logits"}
    for name, t in body["tensors"].items():
        got = np.frombuffer(base64.b64decode(t["data"]), dtype=t["dtype"]).reshape(t["shape"])
        np.testing.assert_array_equal(got, want[name])
    bad = server.post("/v1/trace", {"token_ids": [1], "names": ["layers.9.q"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "names"


# --- batching ---------------------------------------------------------------------------------------------------


def _run_jobs(scheduler: Scheduler, requests: list[list[GenerationRequest]]) -> list[list]:
    """Queue every job before the worker starts (so they arrive together), then collect each job's responses."""

    async def go():
        loop = asyncio.get_running_loop()
        jobs = [Job(loop, rs) for rs in requests]
        for job in jobs:
            scheduler.submit(job)
        scheduler.start()
        out = []
        for job in jobs:
            got = {}
            while len(got) < len(job.requests):
                event = await job.events.get()
                assert event[0] != "error", event
                if event[0] == "done":
                    got[event[1]] = event[2]
            out.append([got[i] for i in range(len(job.requests))])
        scheduler.close()
        return out

    return asyncio.run(go())


def test_requests_arriving_together_batch_and_stay_exact(tiny):
    """Default batching: rows of one prompt length and echo setting share a batch and are bit for bit the request
    alone; others wait for their own batch."""
    engine, reference = tiny("float32")
    make = [GenerationRequest(token_ids=ids, max_new_tokens=k, logprobs=2, temperature=t, seed=3)
            for ids, k, t in (([1, 2, 3, 4], 5, 0.0), ([9, 8, 7, 6], 3, 0.8), ([5, 5, 5], 4, 0.0),
                              ([4, 3, 2, 1], 6, 0.0))]
    scheduler = Scheduler(engine, max_batch_size=8)
    got = _run_jobs(scheduler, [[r] for r in make])
    assert scheduler.stats.batches == 2 and scheduler.stats.largest_batch == 3  # the 4-token prompts together
    for request, [response] in zip(make, got, strict=True):
        alone = reference.generate(request)
        assert response.token_ids == alone.token_ids
        assert [x.logprob for x in response.logprobs] == [x.logprob for x in alone.logprobs]


def test_padded_batches_run_everything_together(tiny):
    engine, reference = tiny("float64")
    make = [GenerationRequest(token_ids=list(range(1, n)), max_new_tokens=4, logprobs=1) for n in (3, 7, 11)]
    scheduler = Scheduler(engine, max_batch_size=8, padded=True)
    got = _run_jobs(scheduler, [make])
    assert scheduler.stats.batches == 1 and scheduler.stats.largest_batch == 3
    for request, response in zip(make, got[0], strict=True):
        alone = reference.generate(request)
        assert response.token_ids == alone.token_ids
        for a, b in zip(response.logprobs, alone.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-10  # the engine's batch tolerance (tests/test_generation.py)


# --- text, chat, streaming (SmolLM2: a real tokenizer and chat template) -----------------------------------------


def test_completion_text_streaming_and_stop(live, smollm2):
    """The engine's text for this prompt is asserted in tests/test_generation.py."""
    server = live(smollm2, "smollm2")
    pieces = [c.choices[0].text for c in server.client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)]
    assert len(pieces) > 2 and "".join(pieces) == " Paris.\n\nThe answer is:"
    stopped = server.client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8,
                                               temperature=0, stop=["s.\n\nThe"])
    assert stopped.choices[0].text == " Pari" and stopped.choices[0].finish_reason == "stop"


def test_chat_completion_logprobs_and_stream(live, smollm2):
    server = live(smollm2, "smollm2")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = smollm2.generate(GenerationRequest(messages=messages, max_new_tokens=32, logprobs=2))
    r = server.client.chat.completions.create(model="smollm2", messages=messages, max_tokens=32, temperature=0,
                                              logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    assert choice.message.content == want.text and choice.finish_reason == "stop"  # eos
    assert [x.logprob for x in choice.logprobs.content] == [x.logprob for x in want.logprobs]
    assert [[t.logprob for t in x.top_logprobs] for x in choice.logprobs.content] == [
        [v for _, v in x.top] for x in want.logprobs]
    stream = server.client.chat.completions.create(model="smollm2", messages=messages, max_tokens=32,
                                                   temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_n_choices_with_a_seed_are_reproducible(live, tiny):
    engine, reference = tiny()
    server = live(engine, "tiny")
    a = server.client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=8, n=3, temperature=1.0,
                                         seed=11, logprobs=0)
    b = server.client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=8, n=3, temperature=1.0,
                                         seed=11, logprobs=0)
    tokens = [c.logprobs.tokens for c in sorted(a.choices, key=lambda c: c.index)]
    assert tokens == [c.logprobs.tokens for c in sorted(b.choices, key=lambda c: c.index)]
    for j, toks in enumerate(tokens):  # choice j draws from seed + j
        want = reference.generate(GenerationRequest(token_ids=[1, 2, 3], max_new_tokens=8, temperature=1.0,
                                                    seed=11 + j))
        assert toks == [f"token_id:{t}" for t in want.token_ids]


# --- refusals ---------------------------------------------------------------------------------------------------

BAD = [  # body, status, param
    ({"prompt": [1, 2], "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": [1, 2], "temperature": 3}, 400, "temperature"),
    ({"prompt": [1, 2], "n": 0}, 400, "n"),
    ({"prompt": [1, 2], "logprobs": 21}, 400, "logprobs"),
    ({"prompt": [1, 2], "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ({"prompt": [1, 2], "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"prompt": [1, 2], "best_of": 3}, 400, "best_of"),
    ({"prompt": [1, 2], "tools": []}, 400, "tools"),
    ({"prompt": [1, 2], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[1, 2], []]}, 400, "prompt"),
    ({"prompt": [1, 64]}, 400, "prompt"),  # outside the vocabulary
    ({"prompt": [1, -1]}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": [1, 2], "stop": 5}, 400, "stop"),
    ({"prompt": "text without a tokenizer"}, 400, "prompt"),
    ({"prompt": [1] * 121}, 400, "prompt"),  # over max_prompt_tokens
    ({"prompt": [1, 2], "max_tokens": 33}, 400, "max_tokens"),  # over the server's max_tokens
    ({"max_tokens": 3}, 400, "prompt"),
]


def _limited(live, tiny) -> Live:
    engine, _ = tiny()
    return live(engine, "tiny", limits=Limits(max_prompt_tokens=120, max_tokens=32, max_body_bytes=4096))


@pytest.mark.parametrize(("body", "status", "param"), BAD, ids=[str(p) for _, _, p in BAD])
def test_bad_completion_requests_name_the_field(live, tiny, body, status, param):
    r = _limited(live, tiny).post("/v1/completions", body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split(".")[0] in error["message"]


def test_other_refusals_have_the_openai_shape(live, tiny):
    server = _limited(live, tiny)
    cases = [
        (server.post("/v1/completions", b"{not json"), 400, None),
        (server.post("/v1/completions", {"prompt": [1] * 2000}), 413, None),  # over max_body_bytes
        (server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}), 400, "messages"),
        (server.post("/v1/chat/completions", {"messages": []}), 400, "messages"),
        (server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
         400, "top_logprobs"),
        (server.post("/v1/logits", {"token_ids": [1], "prompt": "x"}), 400, "token_ids"),
        (httpx.get(f"{server.url}/v1/nothing"), 404, None),
        (httpx.get(f"{server.url}/v1/completions"), 405, None),
    ]
    for response, status, param in cases:
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert response.json()["error"]["param"] == param
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client.completions.create(model="tiny", prompt=[1, 2], max_tokens=1000)


def test_api_key(live, tiny):
    engine, _ = tiny()
    server = live(engine, "tiny", api_key="sesame")
    assert server.client.completions.create(model="tiny", prompt=[1, 2], max_tokens=1).choices
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="open", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="tiny", prompt=[1, 2], max_tokens=1)
    assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key


# --- a client that goes away; load ------------------------------------------------------------------------------


class SlowEngine:
    """The engine with a pause before each forward pass, so a stream is still running when its client leaves; it
    counts the passes."""

    def __init__(self, engine, pause: float):
        self._engine, self.pause, self.forwards = engine, pause, 0

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def forward(self, *args, **kwargs):
        self.forwards += 1
        time.sleep(self.pause)
        return self._engine.forward(*args, **kwargs)


def test_a_client_leaving_mid_stream_stops_its_generation(live, smollm2):
    """SmolLM2, as the tiny fixture has no tokenizer and so streams no text before its last chunk."""
    engine = SlowEngine(smollm2, pause=0.02)
    server = live(engine, "slow")
    stream = server.client.completions.create(model="slow", prompt="Once upon a time", max_tokens=200,
                                              temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while (h := server.health())["scheduler"]["running_rows"] or h["in_flight"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.02)
    assert h["scheduler"]["cancelled_rows"] == 1
    assert engine.forwards < 60  # stopped within a few tokens of the disconnect, not after 200
    again = server.client.completions.create(model="slow", prompt="Hello", max_tokens=2, temperature=0)
    assert again.choices[0].finish_reason == "length"  # and the server goes on serving


def test_requests_over_the_concurrency_limit_get_429(live, tiny):
    engine = SlowEngine(tiny()[0], pause=0.01)
    server = live(engine, "one-at-a-time", limits=Limits(max_concurrent=1))
    body = {"prompt": [1, 5, 9, 20], "max_tokens": 120, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as first:  # holds the one slot
        assert first.status_code == 200
        busy = server.post("/v1/completions", {"prompt": [1, 2], "max_tokens": 1})
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "server_busy"
    deadline = time.monotonic() + 10
    while server.health()["in_flight"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert server.post("/v1/completions", {"prompt": [1, 2], "max_tokens": 1}).status_code == 200


def test_bounded_load(live, tiny):
    """48 requests from 8 concurrent clients (tools/serve_load.py runs the full 200): no errors, each answer the
    engine's, nothing left queued, resident memory flat."""
    engine, reference = tiny()
    server = live(engine, "tiny-load")
    run_load(server.url, 16, 8)  # warm up: first-use allocations are not leaks
    before = server.health()["rss_mb"]
    result = run_load(server.url, 48, 8)
    after = server.health()
    assert not result.errors and len(result.latencies_s) == 48
    assert after["in_flight"] == 0 and after["scheduler"]["queued_rows"] == 0
    assert after["rss_mb"] - before < 25, (before, after["rss_mb"])
    for i in (0, 5, 17, 47):
        body = request_body(i)
        want = reference.generate(GenerationRequest(token_ids=body["prompt"], max_new_tokens=body["max_tokens"],
                                                    logprobs=2))
        assert result.responses[i].choices[0].logprobs.token_logprobs == [x.logprob for x in want.logprobs]
