"""One engine thread that runs the requests waiting together as one batch, and hands results back to the event loop.

HTTP requests arrive on the asyncio loop; the engine computes on a single worker thread (NumPy releases the GIL in
its kernels, so the loop keeps answering). Each request is a `Job` of one or more rows (prompts x `n`); the worker
takes the rows waiting when it becomes free, up to `max_batch_size`, and decodes them as one batch with
`refllama.generation.decode.steps`.

Which rows share a batch decides whether a row's numbers are those of the request alone. Measured on the numpy
backend, float32 and float64: rows of one prompt length and one `echo` setting batch bit for bit as they run alone
(different `max_tokens` do not matter); a left-padded row differs in the last bits (the masked slots change the
order of attention's sums), and so does a row whose neighbour asks for every position's logits (echo). So by default
(`padded=False`) a batch takes only rows with the first row's (prompt length, echo); `padded=True` batches any rows
together, faster under mixed load, each row within the engine's batch tolerance of the request alone.

A streaming client that goes away marks its job cancelled; a batch none of whose rows is still wanted is closed
between two tokens, so its generation stops.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from refllama.generation import GenerationRequest, GenerationResponse, decode
from refllama.generation.decode import Model


class Job:
    """One HTTP request: rows to generate, or one call to run on the engine thread (logits, trace). The worker posts
    events to `events` on the job's event loop: ("text", row, piece) as text becomes final, ("done", row,
    GenerationResponse) per row, ("result", value) for a call, ("error", exception)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, requests: Sequence[GenerationRequest] = (),
                 call: Callable[[], Any] | None = None):
        self.loop = loop
        self.requests = list(requests)
        self.call = call
        self.events: asyncio.Queue[tuple] = asyncio.Queue()
        self.cancelled = False  # set on the loop when the client is gone; read by the worker

    def post(self, *event: object) -> None:
        """From the worker thread: queue an event for the loop (dropped if the loop has shut down)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass


@dataclass
class _Row:
    job: Job
    index: int  # the row's place in its job

    @property
    def request(self) -> GenerationRequest:
        return self.job.requests[self.index]

    @property
    def batch_key(self) -> tuple[int, bool]:
        """Rows with equal keys batch bit for bit as they run alone (token_ids are set by the server)."""
        return len(self.request.token_ids or ()), self.request.echo


@dataclass
class Stats:
    """Counters for /health: what the worker has done since start."""

    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    cancelled_rows: int = 0
    queued_rows: int = 0
    running_rows: int = 0
    errors: int = 0
    calls: int = 0


class Scheduler:
    """The engine's one worker thread and its queue of rows."""

    def __init__(self, engine: Model, max_batch_size: int = 8, padded: bool = False):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.engine, self.max_batch_size, self.padded = engine, max_batch_size, padded
        self.stats = Stats()
        self._waiting: deque[_Row] = deque()
        self._calls: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="refllama-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop taking batches and wait for the one running to end."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, job: Job) -> None:
        with self._ready:
            if job.call is not None:
                self._calls.append(job)
            self._waiting.extend(_Row(job, i) for i in range(len(job.requests)))
            self.stats.queued_rows = len(self._waiting)
            self._ready.notify()

    def _take(self) -> list[_Row] | Job | None:
        """The next work: a call, else a batch of the oldest waiting row and the rows that may join it, in arrival
        order (None: closed). Calls are short single forward passes; they go first."""
        with self._ready:
            while True:
                while self._waiting and self._waiting[0].job.cancelled:
                    self._waiting.popleft()
                    self.stats.cancelled_rows += 1
                if self._waiting or self._calls or self._closed:
                    break
                self._ready.wait()
            if self._closed:
                return None
            if self._calls:
                return self._calls.popleft()
            first = self._waiting.popleft()
            batch, kept = [first], deque()
            for row in self._waiting:
                joins = len(batch) < self.max_batch_size and not row.job.cancelled and (
                    self.padded or row.batch_key == first.batch_key)
                (batch if joins else kept).append(row)
            self._waiting = kept
            self.stats.queued_rows = len(kept)
            return batch

    def _work(self) -> None:
        while (work := self._take()) is not None:
            if isinstance(work, Job):
                self._call(work)
                continue
            self.stats.running_rows = len(work)
            self._run(work)
            self.stats.running_rows = 0

    def _call(self, job: Job) -> None:
        self.stats.calls += 1
        try:
            job.post("result", job.call())
        except Exception as e:  # the client hears of it, the worker lives on
            self.stats.errors += 1
            job.post("error", e)

    def _run(self, batch: list[_Row]) -> None:
        """Decode one batch, posting text as it becomes final; stop early once no row is wanted any more."""
        s = self.stats
        s.batches, s.rows, s.largest_batch = s.batches + 1, s.rows + len(batch), max(s.largest_batch, len(batch))
        steps = decode.steps(self.engine, [row.request for row in batch])
        try:
            while True:
                if all(row.job.cancelled for row in batch):
                    steps.close()
                    s.cancelled_rows += len(batch)
                    return
                try:
                    b, piece = next(steps)
                except StopIteration as done:
                    responses: list[GenerationResponse] = done.value
                    break
                if piece:
                    batch[b].job.post("text", batch[b].index, piece)
        except Exception as e:  # every waiting client must hear of it, and the worker must live on
            s.errors += 1
            for row in batch:
                row.job.post("error", e)
            return
        for row, response in zip(batch, responses, strict=True):
            row.job.post("done", row.index, response)
