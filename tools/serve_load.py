"""A bounded load test for `refllama serve`: N requests from C concurrent clients, then latency percentiles.

    python tools/serve_load.py --url http://127.0.0.1:8080 --requests 200 --clients 8

Each client sends /v1/completions requests one after another (token-id prompts of varied length, greedy, a few
new tokens, logprobs), with the official openai client; the run stops by itself after N requests. It prints the
errors, the latency percentiles, requests per second and the server's /health before and after (resident memory,
batches run). tests/test_serve.py runs a short version of it against its own server.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai


def request_body(i: int, vocab: int = 64) -> dict[str, Any]:
    """The i-th request: a prompt of 3 to 17 token ids, 1 to 8 new tokens, greedy, top-2 logprobs."""
    length = 3 + (i * 7) % 15
    return {"prompt": [1 + (i * 31 + k * 17) % (vocab - 1) for k in range(length)], "max_tokens": 1 + i % 8,
            "temperature": 0, "logprobs": 2}


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    responses: dict[int, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies_s)
        q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
        return {"requests": len(lat) + len(self.errors), "errors": len(self.errors), "wall_s": self.wall_s,
                "requests_per_s": len(lat) / self.wall_s if self.wall_s else 0.0,
                "p50_ms": 1e3 * q[49], "p90_ms": 1e3 * q[89], "p99_ms": 1e3 * q[98], "max_ms": 1e3 * lat[-1]}


def run_load(base_url: str, requests: int, clients: int, vocab: int = 64, api_key: str = "none") -> LoadResult:
    """Send `requests` completions from `clients` threads, each with its own openai client (no retries)."""
    result = LoadResult()

    def client_loop(c: int) -> None:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=120)
        for i in range(c, requests, clients):
            body = request_body(i, vocab)
            start = time.perf_counter()
            try:
                response = client.completions.create(model="load", **body)
            except openai.OpenAIError as e:
                result.errors.append(f"request {i}: {e}")
                continue
            result.latencies_s.append(time.perf_counter() - start)
            result.responses[i] = response

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    result.wall_s = time.perf_counter() - start
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--api-key", default="none")
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"}
    vocab = httpx.post(f"{args.url}/v1/logits", json={"token_ids": [1]}, headers=headers).json()["shape"][1]
    before = httpx.get(f"{args.url}/health").json()
    result = run_load(args.url, args.requests, args.clients, vocab, args.api_key)
    after = httpx.get(f"{args.url}/health").json()
    print(json.dumps({"load": result.summary(), "health_before": before, "health_after": after,
                      "first_errors": result.errors[:5]}, indent=2))


if __name__ == "__main__":
    main()
