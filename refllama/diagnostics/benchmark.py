"""Throughput of a loaded engine: prefill and decode tokens/s, time to first token, peak RSS, and where one decode
step spends its time; the machine's read bandwidth and the weight bytes a decode step streams, whose ratio bounds
decode tokens/s. `refllama bench` and tools/bench.py (which adds llama.cpp and HF transformers) use it.

One repetition is what `generate_ids` does, timed: a prefill forward of the prompt, argmax (the first new token,
so its end is the time to first token), then `new_tokens - 1` decode forwards, greedy, not stopping at eos.
Prefill tokens/s = prompt tokens / prefill time; decode tokens/s = (new tokens - 1) / decode time. Each figure is
the median over the repetitions, after one short untimed run that loads (or compiles) the kernels.
"""

from __future__ import annotations

import functools
import os
import resource
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refllama.errors import InputError
from refllama.generation.decode import forward_steps, greedy
from refllama.model.weights import Linear, MoEWeights, map_arrays

# An English paragraph for prompts, tokenized and cut (or repeated) to the prompt length.
PROMPT_TEXT = (
    "The history of the printing press begins with the invention of movable type, which allowed books to be copied "
    "far faster than by hand. Within a few decades, presses had spread across Europe, and the price of books fell "
    "sharply. Scholars could compare editions, merchants kept printed price lists, and new ideas moved between "
    "cities in weeks rather than years. Historians still debate how much of the scientific revolution, the "
    "Reformation and the growth of literacy should be credited to this one machine, but few doubt that the way "
    "knowledge was stored and shared changed for good."
)


@dataclass
class Throughput:
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float  # medians over the repetitions
    decode_tokens_per_s: float
    time_to_first_token_s: float
    repetitions: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_ids(engine: Any, n: int) -> np.ndarray:
    """n token ids of PROMPT_TEXT in the engine's tokenizer (repeated as needed), or a fixed id range without one."""
    if engine.tokenizer is None:
        return (np.arange(n) * 7919 % (engine.config.vocab_size - 1) + 1).astype(np.int64)
    ids = list(engine.tokenizer.encode(PROMPT_TEXT))
    return np.array((ids * (n // len(ids) + 1))[:n], dtype=np.int64)


def generate_timed(engine: Any, ids: np.ndarray, new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, new ids): the prompt, then new_tokens greedy tokens through the KV cache,
    by the decode loop `generate_ids` runs (not stopping at eos)."""
    first: list[float] = []
    start = time.perf_counter()
    new = greedy(engine, ids, new_tokens, on_first=lambda: first.append(time.perf_counter()))
    return first[0] - start, time.perf_counter() - first[0], new


def measure(engine: Any, prompt_tokens: int = 128, new_tokens: int = 128, repetitions: int = 3,
            ids: np.ndarray | None = None) -> Throughput:
    """Median prefill and decode throughput and time to first token over `repetitions` timed generations. The prompt
    is `ids` when given (a bench hands every engine the same ids), else `prompt_ids(engine, prompt_tokens)`."""
    if prompt_tokens < 1 or new_tokens < 2 or repetitions < 1:
        raise InputError(f"a benchmark needs prompt tokens >= 1, new tokens >= 2 and repetitions >= 1, got "
                         f"{prompt_tokens}, {new_tokens} and {repetitions}")
    if ids is None:
        ids = prompt_ids(engine, prompt_tokens)
    elif len(ids) != prompt_tokens:
        raise InputError(f"{len(ids)} prompt ids for a {prompt_tokens}-token prompt")
    # untimed, the whole prompt: every kernel a prompt of this length runs is loaded (or compiled) and the pages of
    # its buffers are faulted in, so the timed passes are the steady state (a first 128-token pass after an 8-token
    # warm-up took up to 10% longer than the next, for refllama and llama.cpp alike, and reps are often 1)
    generate_timed(engine, ids, 4)
    reps = []
    for _ in range(repetitions):
        prefill, decode, _ = generate_timed(engine, ids, new_tokens)
        reps.append({"prefill_s": prefill, "decode_s": decode, "prefill_tokens_per_s": prompt_tokens / prefill,
                     "decode_tokens_per_s": (new_tokens - 1) / decode})
    return Throughput(prompt_tokens, new_tokens,
                      statistics.median(r["prefill_tokens_per_s"] for r in reps),
                      statistics.median(r["decode_tokens_per_s"] for r in reps),
                      statistics.median(r["prefill_s"] for r in reps), reps)


# --- memory --------------------------------------------------------------------------------------------------------

_STATUS = Path("/proc/self/status")


def rss_mb() -> float:
    """The process's resident set now, in MiB (Linux; elsewhere the peak so far)."""
    if _STATUS.exists():
        return _status_kb("VmRSS:") / 1024
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """The process's peak resident set, in MiB (since reset_peak_rss on Linux; else since it started)."""
    if _STATUS.exists():
        return _status_kb("VmHWM:") / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; bytes on macOS, but no /proc


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count from the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise KeyError(key)


# --- the memory bound of decode ------------------------------------------------------------------------------

def streamed_weight_bytes(engine: Any) -> int:
    """Bytes of weights one decode step reads: every Linear's stored arrays (codes, scales, blocks) and the lm_head
    (the embedding table when tied). The embedding rows a step looks up (hidden x 4 bytes a token) and the norm
    vectors are left out: under 0.2% of SmolLM2-135M's bytes in any of its formats. An MoE layer counts its
    router, its shared expert and top_k / num_experts of its experts (the expected share of a step)."""
    model = engine.model
    total = _linear_bytes(model.lm_head)
    for layer in model.weights.layers:
        if layer is None:
            continue
        total += sum(_linear_bytes(lin) for lin in vars(layer.self_attention).values())
        mlp = layer.mlp
        if isinstance(mlp, MoEWeights):
            experts = sum(_linear_bytes(lin) for expert in mlp.experts for lin in vars(expert).values())
            total += _linear_bytes(mlp.router) + experts * engine.config.moe.top_k // len(mlp.experts)
            if mlp.shared_expert is not None:
                total += sum(_linear_bytes(lin) for lin in vars(mlp.shared_expert).values())
        else:
            total += sum(_linear_bytes(lin) for lin in vars(mlp).values())
    return total


def _linear_bytes(linear: Linear) -> int:
    sizes: list[int] = []
    map_arrays(linear, lambda array: sizes.append(int(array.nbytes)) or array)
    return sum(sizes)


def bound_tokens_per_s(bandwidth_gb_s: float, bytes_per_token: int) -> float:
    """The decode tokens/s a step could reach if it did nothing but stream its weights at `bandwidth_gb_s`."""
    return bandwidth_gb_s * 1e9 / bytes_per_token


def read_bandwidth(threads: int, passes: int = 5, buffer_mib: int | None = None) -> dict[str, Any]:
    """The best read bandwidth (GB/s, 1e9 bytes) of `passes` passes over a buffer several times the last-level cache
    (8x it, at least 256 MiB), so every pass comes from memory, with 1 to `threads` threads: the pace a decode
    matvec can stream its weights at. Two readers at each thread count, and the fastest counts (a reader slower than
    memory, or threads slowed by other work on a shared machine, would make every "% of the bound" look better than
    it is): a Numba parallel float32 sum, and NumPy's sum (SIMD; it releases the GIL) over one contiguous share per
    Python thread."""
    import numba  # the bench's backend; refllama itself does not need it

    if buffer_mib is None:
        llc = os.sysconf("SC_LEVEL3_CACHE_SIZE") if "SC_LEVEL3_CACHE_SIZE" in os.sysconf_names else 0
        buffer_mib = max(256, 8 * max(llc, 0) // 2**20)
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    data = np.ones(buffer_mib * 2**20 // 4, np.float32)  # written once, so its pages are resident
    kernel = _parallel_sum()
    kernel(data[: 1 << 16], 4 * threads)  # compile outside the timing
    chunks = max(16 * threads, -(-data.size // 2**22))  # each float32 sum of ones stays exact (< 2**24)
    seconds: dict[str, list[float]] = {}
    for n in range(1, threads + 1):
        numba.set_num_threads(n)
        shares = np.array_split(data, n)
        readers = {f"numba {n}": lambda: kernel(data, chunks).sum(),
                   f"numpy {n}": functools.partial(_threaded_sums, shares)}
        for _ in range(passes):
            for name, read in readers.items():
                start = time.perf_counter()
                total = read()
                seconds.setdefault(name, []).append(time.perf_counter() - start)
                if name.startswith("numba") and total != data.size:  # ones sum exactly: a skipped part would show
                    raise RuntimeError(f"the bandwidth kernel summed {total}, not {data.size}")
    numba.set_num_threads(threads)
    each = {name: [data.nbytes / t / 1e9 for t in times] for name, times in seconds.items()}
    best = {name: max(values) for name, values in each.items()}
    return {"gb_per_s": max(best.values()), "reader": max(best, key=best.__getitem__), "by_reader": best,
            "buffer_mib": buffer_mib, "threads": threads, "passes": passes,
            "gb_per_s_each": each[f"numba {threads}"]}


def _threaded_sums(shares: list[np.ndarray]) -> float:
    """NumPy's sum of each share on its own thread (NumPy releases the GIL in reductions)."""
    import threading

    sums = [0.0] * len(shares)

    def read(i: int) -> None:
        sums[i] = float(shares[i].sum(dtype=np.float32))

    workers = [threading.Thread(target=read, args=(i,)) for i in range(len(shares))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(sums)


@functools.cache
def _parallel_sum() -> Any:
    """A Numba kernel: the float32 sum of each of `chunks` contiguous slices of `data`, in parallel."""
    import numba

    @numba.njit(fastmath={"reassoc", "contract"})
    def chunk_sum(view: np.ndarray) -> float:  # serial: an array expression in a parallel loop is a region of its own
        acc = np.float32(0.0)  # float32 lanes, as the f32 matvecs read; reassoc lets LLVM vectorise the sum
        for k in range(view.shape[0]):
            acc += view[k]
        return acc

    @numba.njit(parallel=True)
    def parallel_sum(data: np.ndarray, chunks: int) -> np.ndarray:
        size = -(-data.size // chunks)
        sums = np.empty(chunks, np.float64)  # (chunks,)
        for c in numba.prange(chunks):
            sums[c] = chunk_sum(data[c * size:(c + 1) * size])
        return sums

    return parallel_sum


# --- where a decode step goes ----------------------------------------------------------------------------------

_OPS = ("embedding", "rms_norm", "linear", "linears", "apply_rope", "cache_write", "attention", "gated_activation")


def decode_profile(engine: Any, prompt_tokens: int = 128, steps: int = 32) -> dict[str, Any]:
    """Median milliseconds per decode step by backend operation (Linears by projection), after a prefill of
    `prompt_tokens`; `other` is the rest of the step (refllama/model/llama.py's reshapes, residual adds, RoPE
    tables, mask, Python). Shares sum to 1."""
    backend = engine.backend
    names = {id(engine.model.lm_head): "linear lm_head"}
    for layer in engine.model.weights.layers:
        mlp = layer.mlp
        groups = [mlp] if not isinstance(mlp, MoEWeights) else [*mlp.experts, *filter(None, [mlp.shared_expert])]
        for group in (layer.self_attention, *groups):
            for name, lin in vars(group).items():
                names[id(lin)] = f"linear {name}"
        if isinstance(mlp, MoEWeights):
            names[id(mlp.router)] = "linear router"
    spent: dict[str, float] = defaultdict(float)
    running: list[str] = []  # the timed operation under way: one that calls another (linears) counts as one

    def timed(op: str, fn: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            if running:
                return fn(*args)
            running.append(op)
            start = time.perf_counter()
            try:
                result = fn(*args)
            finally:
                running.pop()
            if op == "linear":
                label = names.get(id(args[1]), "linear")
            elif op == "linears":  # q/k/v or gate/up together: "linear q_proj+k_proj+v_proj"
                label = "linear " + "+".join(names.get(id(layer), "linear")[7:] for layer in args[1])
            else:
                label = op
            spent[label] += time.perf_counter() - start
            return result

        return wrapper

    originals = {op: getattr(backend, op) for op in _OPS}
    ids = prompt_ids(engine, prompt_tokens)
    loop = forward_steps(engine, ids[None], steps)
    token = int(np.argmax(next(loop)[0, -1]))  # the prefill, untimed
    per_step: list[dict[str, float]] = []
    try:
        for op, fn in originals.items():
            setattr(backend, op, timed(op, fn))
        for _ in range(steps):
            spent.clear()
            start = time.perf_counter()
            token = int(np.argmax(loop.send(np.array([token]))[0, -1]))
            total = time.perf_counter() - start
            per_step.append({**spent, "other": total - sum(spent.values()), "total": total})
    finally:
        for op in _OPS:
            delattr(backend, op)  # the instance attributes go; the class's methods show again
    labels = sorted({k for step in per_step for k in step} - {"total"})
    ms = {k: 1e3 * statistics.median(step.get(k, 0.0) for step in per_step) for k in labels}
    total = sum(ms.values())
    return {"ms_per_step": dict(sorted(ms.items(), key=lambda kv: -kv[1])),
            "share": {k: v / total for k, v in sorted(ms.items(), key=lambda kv: -kv[1])},
            "step_ms_median": 1e3 * statistics.median(step["total"] for step in per_step), "steps": steps}
