"""refllama against llama.cpp and HF transformers on SmolLM2-135M: one command, one table.

    python tools/bench.py [--model Q4_1.gguf] [--threads 2] [--prompt-tokens 128] [--new-tokens 128] [--rounds 3]
                          [--out bench-results] [--work ~/.cache/refllama/bench] [--rows NAME,...]
                          [--scoring-prompts 16] [--scoring-tokens 256] [--quick] [--busy-core]

Rows (each in a fresh process, with every thread pool set to --threads): refllama numpy f32, numba f32, numba
W8A8 (compressed-tensors, int8 and float32 lm_head), numba Q8_0, Q4_1 and Q4_K_M (GGUF); llama.cpp
(llama-cpp-python) f32, q8_0, Q4_1 and Q4_K_M on the same GGUF files; HF transformers torch f32. A peer that is not
installed is skipped with a message (`pip install -e ".[bench]"` in the checkout installs them). Every engine gets
the same prompt token ids and decodes greedily without stopping at eos. The rows run in --rounds rounds, every row
once a round in a fresh process (--reps repetitions each; refllama/diagnostics/benchmark.py says what one is), so a
machine that slows down or speeds up during the bench moves every row alike instead of the rows that ran late;
figures are medians over every repetition of every round. Within a round the rows of one precision run together
(`round_order`), each refllama row next to the peer its ratio is taken against, and every other round in the
reverse order: this machine's speed drifts over minutes, and rows compared minutes apart took that drift into
their ratio.

The model files are made once in --work from the Q4_1 GGUF (the installed default model): an F32 GGUF (its
weights dequantized, exactly) and a Q8_0 GGUF of those (gguf-py's quantizer, as llama.cpp's), both with the gguf
package; a Q4_K_M GGUF of the F32 one, made by llama.cpp itself (`llama_model_quantize`; where a matrix's rows are
not a multiple of 256, as SmolLM2's 576, llama.cpp falls back to Q5_0/Q8_0 for it); and two compressed-tensors W8A8
folders (tools/make_quant_golden.py: int8 per-channel weights, dynamic per-token int8 activations): the "W8A8"
row's with lm_head int8 too (`ignore: []`, an int8 copy of the tied table), like llama.cpp q8_0's output matrix,
and the "W8A8 (float lm_head)" row's with lm_head float32 (compressed-tensors' default). So every row runs the same
network.

The memory bound: the machine's read bandwidth is measured in the same run, with 1 up to --threads threads and two
readers (a Numba parallel float32 sum, NumPy's sum on one thread per share) over a buffer 8x the last-level cache,
best of 5 passes each, before and after the rows; the highest figure counts. A decode step streams every Linear's
stored bytes and the lm_head (the embedding rows it looks up are under 0.1%, left out); bound tok/s = bandwidth /
those bytes, "% of bound" = decode tok/s / bound. refllama counts the bytes of the weights it loaded (a type it
stores dequantized counts as float32), llama.cpp those of its file's matrices, HF those of its nn.Linear weights.
The row held to the bound (numba f32) is also read against the bandwidth measured right before and right after it,
round by round; that figure is shown beside the target's (the bandwidth can move ~1.8x within minutes).

Scoring (the oracle's main job): logits of every position for --scoring-prompts prompts of --scoring-tokens
deterministic token ids, tokens/s, in a fresh process per engine: refllama numba and numpy f32 (`engine.logits`
per prompt), HF torch f32 (one batched forward of every prompt, the faster way here) and llama.cpp f32
(`logits_all=True`). Each engine's output is checked to hold every position's logits, and refllama's and
llama.cpp's first prompt are compared with HF's.

Also measured: the numba kernels' JIT time cold (empty cache directory) and warm (loaded from it), and where one
decode step spends its time (refllama.diagnostics.benchmark.decode_profile). --busy-core runs the decode rows
again while another process keeps one core busy and reports the share of the quiet decode speed each keeps.
--quick is a smoke run: 1 round of 1 repetition, 32+16 tokens, scoring 2 x 64 tokens, no profiles and no JIT timing.
Output: a markdown table on stdout and in OUT/bench.md, OUT/bench.json, and OUT/bench.png when matplotlib is
installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# name -> (engine, precision class, model file kind, refllama backend)
ROWS: dict[str, tuple[str, str, str, str | None]] = {
    "refllama numpy f32": ("refllama", "f32", "f32", "numpy"),
    "refllama numba f32": ("refllama", "f32", "f32", "numba"),
    "refllama numba W8A8": ("refllama", "q8", "w8a8", "numba"),  # int8 lm_head, as llama.cpp q8_0's output
    "refllama numba W8A8 (float lm_head)": ("refllama", "q8", "w8a8_float_head", "numba"),
    "refllama numba Q8_0": ("refllama", "q8", "q8_0", "numba"),
    "refllama numba Q4_1": ("refllama", "q4", "q4_1", "numba"),
    "refllama numba Q4_K_M": ("refllama", "q4k", "q4_k_m", "numba"),
    # MLX on Linux is the mlx[cpu] wheel (reference BLAS, one thread): a correctness backend here, Metal on a Mac
    "refllama mlx f32": ("refllama", "f32", "f32", "mlx"),
    "llama.cpp f32": ("llama.cpp", "f32", "f32", None),
    "llama.cpp q8_0": ("llama.cpp", "q8", "q8_0", None),
    "llama.cpp Q4_1": ("llama.cpp", "q4", "q4_1", None),
    "llama.cpp Q4_K_M": ("llama.cpp", "q4k", "q4_k_m", None),
    "HF torch f32": ("hf", "f32", "f32", None),
}
PEER = {"f32": "llama.cpp f32", "q8": "llama.cpp q8_0", "q4": "llama.cpp Q4_1", "q4k": "llama.cpp Q4_K_M"}
# The scoring rows: all positions' logits of the f32 network
SCORING = ["refllama numba f32", "refllama numpy f32", "HF torch f32", "llama.cpp f32"]
NUMBA_ROWS = [name for name, (_, _, _, backend) in ROWS.items() if backend == "numba"]
# The rows held to the speed targets: the float-lm_head W8A8 row is shown, not compared like for like
TARGET_ROWS = [name for name in NUMBA_ROWS if name != "refllama numba W8A8 (float lm_head)"]

# The targets, the CPU speed plan's "done when": (row, metric, reference row or None, minimum). Metrics: prefill,
# decode and scoring (tokens/s over the reference row's), bound (decode tokens/s over the row's memory bound), rss
# (the RSS bound 1.3 x file + KV over the peak RSS growth), busy (decode with one core kept busy over quiet decode;
# measured with --busy-core).
TARGETS: list[tuple[str, str, str | None, float]] = [
    *[(row, "decode", PEER[ROWS[row][1]], 1.0) for row in TARGET_ROWS],  # W8A8: with the int8 lm_head, vs q8_0
    ("refllama numba f32", "bound", None, 0.85),
    *[(row, "prefill", PEER[ROWS[row][1]], 1.0) for row in TARGET_ROWS],
    ("refllama numba f32", "prefill", "HF torch f32", 1.0),
    ("refllama numba f32", "scoring", "HF torch f32", 1.0),
    ("refllama numba Q4_1", "rss", None, 1.0),
    *[(row, "busy", None, 0.4) for row in TARGET_ROWS],
]
# Rows held to a bound: the bandwidth is also read right before and right after each of their rounds (`bounds`)
BESIDE_ROWS = [row for row, metric, _, _ in TARGETS if metric == "bound"]


# --- model files ---------------------------------------------------------------------------------------------------

def make_models(q4_1: Path, work: Path) -> dict[str, Path]:
    """The Q4_1 GGUF plus F32 and Q8_0 GGUFs of the same weights and the W8A8 folders (int8 and float32 lm_head),
    made once in `work`."""
    work.mkdir(parents=True, exist_ok=True)
    files = {"q4_1": q4_1, "f32": work / f"{q4_1.stem}.F32.gguf", "q8_0": work / f"{q4_1.stem}.Q8_0.gguf",
             "w8a8": work / f"{q4_1.stem}.W8A8-int8-head", "w8a8_float_head": work / f"{q4_1.stem}.W8A8"}
    for kind in ("f32", "q8_0"):
        if not files[kind].exists():
            print(f"making {files[kind]} ...", file=sys.stderr)
            _requantize_gguf(q4_1, files[kind], kind)
    for kind in ("w8a8", "w8a8_float_head"):
        if not (files[kind] / "config.json").exists():
            print(f"making {files[kind]} ...", file=sys.stderr)
            sys.path.insert(0, str(ROOT / "tools"))
            import make_quant_golden

            make_quant_golden.write_refllama(files[kind], int8_head=kind == "w8a8")
    return files


def _requantize_gguf(source: Path, target: Path, kind: str) -> None:
    """Copy a GGUF with every quantized matrix dequantized (F32) or re-quantized to Q8_0; F32 tensors stay."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(target) + ".part", arch)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        value = int(file_type) if field.name == "general.file_type" else field.contents()
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        data = tensor.data
        if tensor.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.dequantize(data, tensor.tensor_type)  # float32, numpy shape
        if kind == "q8_0" and data.ndim == 2:
            writer.add_tensor(tensor.name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # shape: the blocks' bytes per row
        else:
            writer.add_tensor(tensor.name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(target) + ".part").rename(target)


def make_q4_k_m(f32: Path, threads: int) -> Path:
    """A Q4_K_M GGUF of the F32 one beside it, made once by llama.cpp's own quantizer (in a child process)."""
    target = f32.with_name(f32.name.replace(".F32.gguf", ".Q4_K_M.gguf"))
    if not target.exists():
        print(f"making {target} ...", file=sys.stderr)
        run_child({"task": "quantize", "source": str(f32), "target": str(target), "threads": threads}, threads)
    return target


def _child_quantize(spec: dict[str, Any]) -> dict[str, Any]:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype = spec["threads"], llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    part = spec["target"] + ".part"
    status = llama_cpp.llama_model_quantize(spec["source"].encode(), part.encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize returned {status} for {spec['source']}")
    Path(part).rename(spec["target"])
    return {"file": spec["target"]}


def gguf_matrix_bytes(tensors: dict[str, Any]) -> int:
    """Bytes a decode step streams from a GGUF's tensors (name -> info with .shape and .nbytes): every matrix but
    the embedding table, which counts only as the output matrix of a model that has no `output.weight` (tied)."""
    tied = "output.weight" not in tensors
    return sum(info.nbytes for name, info in tensors.items()
               if len(info.shape) == 2 and (name != "token_embd.weight" or tied))


# --- one engine in a child process -----------------------------------------------------------------------------

def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One task in this fresh process: time an engine's generations, score prompts, quantize a file, or measure
    the read bandwidth."""
    task = spec.get("task", "generate")
    if task == "bandwidth":
        from refllama.diagnostics.benchmark import read_bandwidth

        return read_bandwidth(spec["threads"], passes=spec["passes"])
    if task == "quantize":
        return _child_quantize(spec)
    if task == "score":
        return _child_score(spec)
    engine, path, ids = spec["engine"], spec["path"], np.array(spec["ids"], np.int64)
    prompt, new, reps = len(ids), spec["new_tokens"], spec["reps"]
    if engine == "refllama":
        return _child_refllama(spec, path, prompt, new, reps)
    if engine == "llama.cpp":
        return _child_llama_cpp(spec, path, ids, new, reps)
    return _child_hf(spec, path, ids, new, reps)


def _child_refllama(spec: dict[str, Any], path: str, prompt: int, new: int, reps: int) -> dict[str, Any]:
    import refllama
    from refllama.backends import get_backend
    from refllama.diagnostics import benchmark

    get_backend(spec["backend"])  # import the backend's libraries before the memory baseline
    before_runtime = benchmark.rss_mb()
    if spec["backend"] == "numba":
        # Start Numba's runtime too (LLVM, the cached kernels' code): a fixed cost of the engine, like the code pages
        # of llama.cpp's library or torch's, not of the model; it is reported apart as runtime_rss_mb. Both modules'
        # kernels: with numba_gemm's prompt kernels left out, a cold cache compiled them inside the measured run.
        from refllama.backends import numba_gemm, numba_kernels

        numba_kernels.warm_up()
        numba_gemm.warm_up()
    base = benchmark.rss_mb()
    benchmark.reset_peak_rss()
    start = time.perf_counter()
    engine = refllama.load(path, backend=spec["backend"], dtype="float32")
    load_s, loaded = time.perf_counter() - start, benchmark.rss_mb()
    start = time.perf_counter()
    benchmark.generate_timed(engine, np.array(spec["ids"][:8]), 2)
    first_call_s = time.perf_counter() - start
    # the ids the peers get: the engine's own tokenizer is not asked for (a GGUF's is built on first use)
    result = benchmark.measure(engine, prompt, new, reps, ids=np.array(spec["ids"], np.int64)).to_dict()
    result.update(load_s=load_s, first_call_s=first_call_s, rss_base_mb=base, rss_loaded_mb=loaded,
                  runtime_rss_mb=base - before_runtime,
                  rss_peak_mb=benchmark.peak_rss_mb(), weight_bytes_per_token=benchmark.streamed_weight_bytes(engine))
    if spec.get("profile"):
        result["decode_profile"] = benchmark.decode_profile(engine, prompt)
    return result


def _timed_reps(run: Any, prompt: int, new: int, reps: int) -> dict[str, Any]:
    run(prompt, 4)  # untimed warm-up with the whole prompt, as benchmark.measure
    rows = []
    for _ in range(reps):
        prefill, decode = run(prompt, new)
        rows.append({"prefill_s": prefill, "decode_s": decode, "prefill_tokens_per_s": prompt / prefill,
                     "decode_tokens_per_s": (new - 1) / decode})
    return {"prompt_tokens": prompt, "new_tokens": new,
            "prefill_tokens_per_s": float(np.median([r["prefill_tokens_per_s"] for r in rows])),
            "decode_tokens_per_s": float(np.median([r["decode_tokens_per_s"] for r in rows])),
            "time_to_first_token_s": float(np.median([r["prefill_s"] for r in rows])), "repetitions": rows}


def _child_llama_cpp(spec: dict[str, Any], path: str, ids: np.ndarray, new: int, reps: int) -> dict[str, Any]:
    import llama_cpp

    from refllama.diagnostics import benchmark
    from refllama.formats.gguf import GGUFFile

    base = benchmark.rss_mb()
    benchmark.reset_peak_rss()
    threads = spec["threads"]
    start = time.perf_counter()
    llm = llama_cpp.Llama(path, n_ctx=len(ids) + new + 16, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    load_s, loaded = time.perf_counter() - start, benchmark.rss_mb()
    vocab = llm.n_vocab()

    def next_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    def run(prompt: int, n: int) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids[:prompt].tolist())
        token = next_token()
        first = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([token])
            token = next_token()
        return first - start, time.perf_counter() - first

    result = _timed_reps(run, len(ids), new, reps)
    result.update(load_s=load_s, rss_base_mb=base, rss_loaded_mb=loaded, rss_peak_mb=benchmark.peak_rss_mb(),
                  version=llama_cpp.__version__, weight_bytes_per_token=gguf_matrix_bytes(GGUFFile(path).tensors))
    return result


def _load_hf(path: str) -> Any:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name,
                                                              dtype=torch.float32)
    return model.eval()


def _hf_linear_bytes(model: Any) -> int:
    """Bytes of every nn.Linear's parameters (lm_head included, once, though tied to the embedding)."""
    import torch

    return sum(p.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())


def _child_hf(spec: dict[str, Any], path: str, ids: np.ndarray, new: int, reps: int) -> dict[str, Any]:
    import torch
    import transformers

    from refllama.diagnostics import benchmark

    torch.set_num_threads(spec["threads"])
    base = benchmark.rss_mb()
    benchmark.reset_peak_rss()
    start = time.perf_counter()
    model = _load_hf(path)
    load_s, loaded = time.perf_counter() - start, benchmark.rss_mb()
    prompt_ids = torch.tensor(ids[None])

    @torch.inference_mode()
    def run(prompt: int, n: int) -> tuple[float, float]:
        start = time.perf_counter()
        out = model(prompt_ids[:, :prompt], use_cache=True, logits_to_keep=1)  # as generate() does
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        first = time.perf_counter()
        past = out.past_key_values
        for _ in range(n - 1):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return first - start, time.perf_counter() - first

    result = _timed_reps(run, len(ids), new, reps)
    result.update(load_s=load_s, rss_base_mb=base, rss_loaded_mb=loaded, rss_peak_mb=benchmark.peak_rss_mb(),
                  version=f"transformers {transformers.__version__}, torch {torch.__version__}",
                  weight_bytes_per_token=_hf_linear_bytes(model))
    return result


# --- scoring: every position's logits ------------------------------------------------------------------------

# HF scores the prompts in one batched forward. Measured on the 2-core machine this bench was written on (8 x 256
# tokens, 2 threads, alternating, a busy machine): batched 85 and 56 tok/s, one forward per prompt 21 and 19.
HF_SCORING_BATCHED = True


def scoring_prompts(text_ids: list[int], prompts: int, tokens: int) -> list[list[int]]:
    """`prompts` deterministic prompts of `tokens` ids: the text's ids cycled, prompt p starting at id 7p."""
    return [[text_ids[(7 * p + t) % len(text_ids)] for t in range(tokens)] for p in range(prompts)]


def _child_score(spec: dict[str, Any]) -> dict[str, Any]:
    """Time `reps` passes over the prompts, each prompt's logits (T, vocab) kept; check every shape; save the
    first prompt's logits (for the cross-check in the parent)."""
    prompts = [np.array(p, np.int64) for p in spec["prompts"]]
    score, how, version = _scorer(spec)
    # untimed: a whole prompt, so every kernel a prompt runs is compiled or loaded (refllama's prompt kernels start
    # at 32 tokens: an 8-token warm-up left their loading to the timed pass) and its pages are faulted in
    score([prompts[0]])
    seconds, kept = [], []
    for _ in range(spec["reps"]):
        kept = []  # the previous pass's logits go before the next pass, so memory holds one pass
        start = time.perf_counter()
        kept = score(prompts)
        seconds.append(time.perf_counter() - start)
    shapes = sorted({tuple(int(n) for n in logits.shape) for logits in kept})
    complete = (len(kept) == len(prompts) and len(shapes) == 1 and shapes[0][0] == len(prompts[0])
                and all(np.isfinite(logits).all() for logits in kept))
    np.save(spec["save"], np.asarray(kept[0], np.float32))
    tokens = sum(len(p) for p in prompts)
    return {"tokens": tokens, "prompts": len(prompts), "seconds": seconds,
            "tokens_per_s": tokens / float(np.median(seconds)), "shapes": shapes, "complete": bool(complete),
            "how": how, "version": version}


def _scorer(spec: dict[str, Any]) -> tuple[Any, str, str]:
    """For the spec's engine: a function from prompts (each (T,) ids) to their logits (each (T, vocab), NumPy),
    how it runs them, and the engine's version."""
    path, threads = spec["path"], spec["threads"]
    if spec["engine"] == "refllama":
        import refllama

        engine = refllama.load(path, backend=spec["backend"], dtype="float32")
        return (lambda prompts: [engine.logits(ids) for ids in prompts]), "engine.logits per prompt", (
            f"refllama {refllama.__version__}")
    if spec["engine"] == "llama.cpp":
        import llama_cpp

        tokens = len(spec["prompts"][0])
        llm = llama_cpp.Llama(path, n_ctx=tokens, n_batch=tokens, n_ubatch=tokens, n_threads=threads,
                              n_threads_batch=threads, logits_all=True, verbose=False)

        def score_llama_cpp(prompts: list[np.ndarray]) -> list[np.ndarray]:
            out = []
            for ids in prompts:
                llm.reset()
                llm.eval(ids.tolist())
                out.append(llm.scores[: len(ids)].copy())  # (T, vocab): the next prompt rewrites its buffer
            return out

        return score_llama_cpp, "logits_all, one eval per prompt", f"llama-cpp-python {llama_cpp.__version__}"
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = _load_hf(path)

    @torch.inference_mode()
    def score_hf(prompts: list[np.ndarray]) -> list[np.ndarray]:
        if HF_SCORING_BATCHED and len({len(ids) for ids in prompts}) == 1:
            logits = model(torch.from_numpy(np.stack(prompts)), use_cache=False).logits  # (P, T, vocab)
            return list(logits.numpy())
        return [model(torch.from_numpy(ids)[None], use_cache=False).logits[0].numpy() for ids in prompts]

    how = "one batched forward of every prompt" if HF_SCORING_BATCHED else "one forward per prompt"
    return score_hf, how, f"transformers {transformers.__version__}, torch {torch.__version__}"


def cross_check(saved: dict[str, Path], reference: str = "HF torch f32") -> dict[str, dict[str, Any]]:
    """Max |logit difference| of each engine's first scored prompt against the reference's; refllama's must be
    within the SmolLM2 float32 bound (refllama/testing/golden.py), llama.cpp's arithmetic differs (reported only)."""
    from refllama.testing.golden import SMOLLM2_ATOL

    if reference not in saved:
        return {}
    ref = np.load(saved[reference])
    out = {}
    for name, path in saved.items():
        if name == reference:
            continue
        ours = np.load(path)
        diff = float(np.abs(ours - ref).max()) if ours.shape == ref.shape else float("inf")
        bound = SMOLLM2_ATOL if name.startswith("refllama") else None
        out[name] = {"max_abs_diff": diff, "bound": bound, "within": None if bound is None else diff <= bound}
    return out


def child_jit(cache_dir: str) -> dict[str, Any]:
    """Import the numba kernels and compile (or load) them all with NUMBA_CACHE_DIR = cache_dir."""
    os.environ["NUMBA_CACHE_DIR"] = cache_dir
    start = time.perf_counter()
    from refllama.backends import numba_gemm, numba_kernels

    imported = time.perf_counter()
    numba_kernels.warm_up()
    numba_gemm.warm_up()
    return {"import_s": imported - start, "compile_or_load_s": time.perf_counter() - imported}


# --- the parent: run the children, tabulate ----------------------------------------------------------------------

def thread_env(threads: int, adaptive: bool = False) -> dict[str, str]:
    """Every thread pool set to `threads`; with `adaptive`, REFLLAMA_NUM_THREADS is left unset, so the numba backend
    chooses as it does by default (all usable CPUs, one thread while the load average says they are busy)."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "REFLLAMA_NUM_THREADS"):
        env[key] = str(threads)
    if adaptive:
        del env["REFLLAMA_NUM_THREADS"]
    return env


def run_child(payload: dict[str, Any], threads: int, timeout: float = 3600, adaptive: bool = False) -> dict[str, Any]:
    """Run this script as a child with the payload; its last stdout line is the JSON result."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(payload)], capture_output=True, text=True,
                         env=thread_env(threads, adaptive), timeout=timeout)
    if out.returncode < 0:  # a signal; SIGILL: the library was built for instructions this CPU lacks
        raise RuntimeError(f"killed by {signal.Signals(-out.returncode).name}")
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def available(engine: str, backend: str | None = None) -> str | None:
    """None if the engine (and refllama backend) can run here, else why not."""
    if backend is not None:
        from refllama.backends import get_backend
        from refllama.errors import BackendError

        try:
            get_backend(backend)
        except BackendError as e:
            return str(e)
    modules = {"refllama": [], "llama.cpp": ["llama_cpp"], "hf": ["torch", "transformers", "gguf"]}[engine]
    for module in modules:
        try:
            __import__(module)
        except ImportError as e:
            return f"{module} is not installed ({e}); pip install -e \".[bench]\""
    return None


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "load_average": load,
            "numpy": np.__version__}


def bounds(rows: dict[str, dict[str, Any]], bandwidth_gb_s: float | None) -> dict[str, Any]:
    """Each row's weight bytes per decode step, its memory bound (tokens/s) and the share of it decode reached.

    A row whose bandwidth was also read beside each round (BESIDE_ROWS) gets `beside`: each round's decode over the
    bound of the higher of the two readings around it, and their median. This machine's bandwidth moved between
    ~33 and ~60 GB/s within minutes, sometimes within one measurement; the run's highest reading, which `fraction`
    and the target use, may come from minutes in which the row did not run."""
    from refllama.diagnostics.benchmark import bound_tokens_per_s

    out: dict[str, Any] = {}
    for name, r in rows.items():
        if bandwidth_gb_s and r.get("weight_bytes_per_token") and "decode_tokens_per_s" in r:
            nbytes = r["weight_bytes_per_token"]
            bound = bound_tokens_per_s(bandwidth_gb_s, nbytes)
            out[name] = {"bytes_per_token": nbytes, "bound_tokens_per_s": bound,
                         "fraction": r["decode_tokens_per_s"] / bound}
            rounds = zip(r.get("round_decode_tokens_per_s", []), r.get("bandwidth_beside", []), strict=True)
            paired = [(decode / bound_tokens_per_s(max(readings), nbytes), max(readings))
                      for decode, readings in rounds if readings]
            if paired:
                out[name]["beside"] = {"fractions": [f for f, _ in paired], "gb_per_s": [g for _, g in paired],
                                       "median": float(np.median([f for f, _ in paired]))}
    return out


def ratios(rows: dict[str, dict[str, Any]], scoring: dict[str, dict[str, Any]] | None = None
           ) -> dict[str, dict[str, float]]:
    """Each refllama row's prefill and decode tokens/s over llama.cpp's at its precision class and over HF f32;
    and each refllama scoring row's tokens/s over HF's and llama.cpp's."""
    out: dict[str, dict[str, float]] = {}
    for name, (engine, precision, _, _) in ROWS.items():
        if engine != "refllama" or "decode_tokens_per_s" not in rows.get(name, {}):
            continue
        entry = {}
        for peer_name, label in ((PEER[precision], "llama.cpp"), ("HF torch f32", "HF")):
            peer = rows.get(peer_name, {})
            for metric in ("prefill", "decode"):
                if f"{metric}_tokens_per_s" in peer:
                    entry[f"{metric} / {label}"] = (rows[name][f"{metric}_tokens_per_s"]
                                                    / peer[f"{metric}_tokens_per_s"])
        out[name] = entry
    scoring = scoring or {}
    for name in SCORING:
        if "tokens_per_s" not in scoring.get(name, {}):
            continue
        for peer_name, label in (("HF torch f32", "HF"), ("llama.cpp f32", "llama.cpp")):
            if peer_name != name and "tokens_per_s" in scoring.get(peer_name, {}):
                out.setdefault(name, {})[f"scoring / {label}"] = (scoring[name]["tokens_per_s"]
                                                                  / scoring[peer_name]["tokens_per_s"])
    return out


def target_value(report: dict[str, Any], row: str, metric: str, reference: str | None) -> float | None:
    """The measured figure a target compares with its minimum, or None where a row was not measured."""
    rows, scoring = report.get("rows", {}), report.get("scoring", {})
    if metric in ("prefill", "decode"):
        key = f"{metric}_tokens_per_s"
        ours, theirs = rows.get(row, {}), rows.get(reference, {})
        return ours[key] / theirs[key] if key in ours and key in theirs else None
    if metric == "scoring":
        ours, theirs = scoring.get(row, {}), scoring.get(reference, {})
        if "tokens_per_s" not in ours or "tokens_per_s" not in theirs:
            return None
        return ours["tokens_per_s"] / theirs["tokens_per_s"] if ours.get("valid") else 0.0  # wrong logits: not met
    if metric == "bound":
        return report.get("bounds", {}).get(row, {}).get("fraction")
    if metric == "busy":
        return report.get("busy", {}).get(row, {}).get("kept")
    if metric == "rss":
        rss = report.get("q4_1_rss")
        return rss["bound_mb"] / rss["peak_minus_base_mb"] if rss else None
    raise ValueError(f"unknown target metric {metric!r}")


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for row, metric, reference, minimum in TARGETS:
        value = target_value(report, row, metric, reference)
        found.append({"row": row, "metric": metric, "reference": reference, "target": minimum, "ratio": value,
                      "met": None if value is None else value >= minimum})
    return found


def target_text(t: dict[str, Any]) -> str:
    """How a target reads in the table: 'numba f32 decode >= 1.0x llama.cpp f32', '... >= 85% of the bound'."""
    what = {"bound": "decode", "busy": "decode with one core busy"}.get(t["metric"], t["metric"])
    if t["metric"] == "bound":
        return f"{t['row']} {what} >= {100 * t['target']:.0f}% of its memory bound"
    if t["metric"] == "busy":
        return f"{t['row']} {what} >= {100 * t['target']:.0f}% of quiet decode"
    if t["metric"] == "rss":
        return f"{t['row']} peak RSS over the baseline <= 1.3 x file + KV cache"
    return f"{t['row']} {what} >= {t['target']}x {t['reference']}"


def _measured(t: dict[str, Any]) -> str:
    if t["ratio"] is None:
        return "n/a (run with --busy-core)" if t["metric"] == "busy" else "n/a (a row is missing)"
    if t["metric"] == "rss":
        return f"the bound is {t['ratio']:.2f}x the growth"
    return f"{100 * t['ratio']:.0f}%" if t["metric"] in ("bound", "busy") else f"{t['ratio']:.2f}x"


def markdown(report: dict[str, Any]) -> str:
    rows, m, s = report["rows"], report["machine"], report["settings"]
    load = m["load_average"]
    bw = report.get("bandwidth", {})
    lines = [f"# refllama bench: SmolLM2-135M, {s['threads']} threads, {s['prompt_tokens']}-token prompt, "
             f"{s['new_tokens']} new tokens, median of {s['rounds']} rounds x {s['reps']}", "",
             f"{m['cpu']}, {m['cores']} cores; load average before/after: "
             f"{', '.join(f'{x:.2f}' for x in load or [])} / "
             f"{', '.join(f'{x:.2f}' for x in report.get('load_average_after') or [])}; the whole bench took "
             f"{report.get('wall_s', 0):.0f} s", ""]
    if bw.get("gb_per_s"):
        lines += [f"Read bandwidth, up to {s['threads']} threads (best pass over a {bw['buffer_mib']} MiB buffer): "
                  + ", ".join(f"{when} {bw[when]['gb_per_s']:.1f} GB/s" for when in ("before", "after") if when in bw)
                  + f"; the bound uses {bw['gb_per_s']:.1f} GB/s. Bound tok/s = bandwidth / weight bytes a decode "
                  "step streams (MB/token: every Linear as loaded, and the lm_head).", ""]
    for name, b in report.get("bounds", {}).items():
        if "beside" in b:
            each = ", ".join(f"{100 * f:.0f}% of {g:.1f}" for f, g in zip(b["beside"]["fractions"],
                                                                        b["beside"]["gb_per_s"], strict=True))
            lines += [f"{name} decode against the bandwidth read right before and after it, round by round: {each} "
                      f"GB/s; median {100 * b['beside']['median']:.0f}% (shown; the target uses the run's "
                      "highest reading).", ""]
    lines += ["| engine | prefill tok/s | decode tok/s | MB/token | bound tok/s | % of bound | TTFT ms | load s | "
              "RSS loaded MiB | peak RSS MiB | peak - base MiB | prefill / llama.cpp | decode / llama.cpp | "
              "prefill / HF | decode / HF |", "|---" * 15 + "|"]
    for name in ROWS:
        r = rows.get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | skipped: {r['error']} |" + " |" * 13)
            continue
        q, b = report["ratios"].get(name, {}), report.get("bounds", {}).get(name)

        def fmt(key: str, q: dict = q) -> str:
            return f"{q[key]:.2f}x" if key in q else ""

        bound = (f"{b['bytes_per_token'] / 1e6:.0f} | {b['bound_tokens_per_s']:.1f} | {100 * b['fraction']:.0f}%"
                 if b else " | | ")
        lines.append(f"| {name} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | {bound} | "
                     f"{1e3 * r['time_to_first_token_s']:.0f} | {r['load_s']:.2f} | {r['rss_loaded_mb']:.0f} | "
                     f"{r['rss_peak_mb']:.0f} | {r['rss_peak_mb'] - r['rss_base_mb']:.0f} | "
                     f"{fmt('prefill / llama.cpp')} | {fmt('decode / llama.cpp')} | {fmt('prefill / HF')} | "
                     f"{fmt('decode / HF')} |")
    lines += _scoring_lines(report)
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in report["targets"]:
        met = "" if t["met"] is None else ("met" if t["met"] else "not met")
        lines.append(f"| {target_text(t)} | {_measured(t)} | {met} |")
    rss = report.get("q4_1_rss")
    if rss:
        lines += ["", f"Q4_1 GGUF, numba: peak RSS minus the pre-load baseline {rss['peak_minus_base_mb']:.0f} MiB "
                  f"against 1.3 x file ({rss['file_mb']:.1f} MiB) + KV cache ({rss['kv_mb']:.1f} MiB) = "
                  f"{rss['bound_mb']:.0f} MiB: {'met' if rss['met'] else 'not met'} (the baseline is taken after "
                  f"Numba's runtime has started and loaded the cached kernels, which took "
                  f"{rss.get('runtime_mb', 0.0):.0f} MiB; "
                  "the engine runs the prompt ids every row gets: its GGUF tokenizer is checked at load and not "
                  "built)."]
    lines += _busy_lines(report)
    jit = report.get("jit")
    if jit:
        lines += ["", f"Numba JIT: cold compile of every kernel {jit['cold']['compile_or_load_s']:.1f} s, warm load "
                  f"from the cache {jit['warm']['compile_or_load_s']:.2f} s (import {jit['warm']['import_s']:.2f} s)."]
    for name, profile in report.get("profiles", {}).items():
        lines += ["", f"## One decode step, {name} (median {profile['step_ms_median']:.2f} ms over "
                  f"{profile['steps']} steps)", "", "| op | ms | share |", "|---|---|---|"]
        for op, ms in profile["ms_per_step"].items():
            lines.append(f"| {op} | {ms:.3f} | {100 * profile['share'][op]:.1f}% |")
    return "\n".join(lines) + "\n"


def _scoring_lines(report: dict[str, Any]) -> list[str]:
    scoring, s = report.get("scoring", {}), report["settings"]
    if not scoring:
        return []
    check = report.get("scoring_check", {})
    lines = ["", f"## Scoring: logits of every position, {s['scoring_prompts']} prompts x {s['scoring_tokens']} "
             f"tokens, median of {s['scoring_reps']} timed pass(es) after an untimed warm-up", "",
             "| engine | tokens/s | s per pass | logits per prompt | every position | max abs diff vs HF (bound) | "
             "/ HF | / llama.cpp |", "|---|---|---|---|---|---|---|---|"]
    for name in SCORING:
        r = scoring.get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | skipped: {r['error']} |" + " |" * 6)
            continue
        q, c = report["ratios"].get(name, {}), check.get(name)
        diff = "" if c is None else f"{c['max_abs_diff']:.2e}" + (
            "" if c["bound"] is None else f" ({c['bound']:.0e}: {'ok' if c['within'] else 'OUTSIDE'})")
        shapes = ", ".join("x".join(map(str, shape)) for shape in r["shapes"])
        lines.append(f"| {name} ({r['how']}) | {r['tokens_per_s']:.0f} | {float(np.median(r['seconds'])):.2f} | "
                     f"{shapes} | {'yes' if r['complete'] else 'NO'} | {diff} | "
                     + " | ".join(f"{q[k]:.2f}x" if k in q else "" for k in ("scoring / HF", "scoring / llama.cpp"))
                     + " |")
    return lines


def _busy_lines(report: dict[str, Any]) -> list[str]:
    busy = report.get("busy")
    if not busy:
        return []
    lines = ["", "## Decode with another process keeping one core busy", "",
             "| engine | quiet decode tok/s | busy decode tok/s | kept | quiet TTFT ms | busy TTFT ms |",
             "|---|---|---|---|---|---|"]
    for name, b in busy.items():
        if "error" in b:
            lines.append(f"| {name} | {b['error']} | | | | |")
        else:
            lines.append(f"| {name} | {b['quiet']:.1f} | {b['busy']:.1f} | {100 * b['kept']:.0f}% | "
                         f"{1e3 * b['quiet_ttft_s']:.0f} | {1e3 * b['busy_ttft_s']:.0f} |")
    return lines


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = {k: v for k, v in report["rows"].items() if "decode_tokens_per_s" in v}
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.5))
    for ax, metric in zip(axes, ("prefill", "decode"), strict=True):
        names = list(rows)[::-1]
        ax.barh(names, [rows[n][f"{metric}_tokens_per_s"] for n in names],
                color=["tab:blue" if n.startswith("refllama") else "tab:gray" for n in names])
        ax.set_xlabel(f"{metric} tokens/s")
    axes[1].set_yticklabels([])
    s = report["settings"]
    fig.suptitle(f"SmolLM2-135M, {s['threads']} threads, {s['prompt_tokens']}-token prompt, "
                 f"{s['new_tokens']} new tokens (median of {s['rounds']} rounds x {s['reps']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


# --quick's settings, and the defaults otherwise
QUICK = {"rounds": 1, "reps": 1, "prompt_tokens": 32, "new_tokens": 16, "scoring_prompts": 2,
         "scoring_tokens": 64, "scoring_reps": 1, "bandwidth_passes": 3}
DEFAULTS = {"rounds": 3, "reps": 1, "prompt_tokens": 128, "new_tokens": 128, "scoring_prompts": 16,
            "scoring_tokens": 256, "scoring_reps": 1, "bandwidth_passes": 5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-jit", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help="a Q4_1 GGUF (default: the installed SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run: " + ", ".join(
        f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + "; no profiles, no JIT timing")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"default {value} ({QUICK[key]} with --quick)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "refllama" / "bench",
                        help="where the F32/Q8_0/Q4_K_M GGUFs and the W8A8 folders are made once")
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--no-scoring", action="store_true", help="leave out the scoring rows")
    parser.add_argument("--busy-core", action="store_true",
                        help="run the decode rows again while another process keeps one core busy")
    parser.add_argument("--profile", help="rows whose decode step is profiled by operation (default: numba Q4_1, "
                        "W8A8 and f32; none with --quick)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.profile is None:
        args.profile = "" if args.quick else "refllama numba Q4_1,refllama numba W8A8,refllama numba f32"
    return args


def main() -> int:
    args = parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.child_jit:
        print(json.dumps(child_jit(args.child_jit)))
        return 0
    if args.reps < 3:
        print("note: fewer than 3 repetitions", file=sys.stderr)
    began = time.perf_counter()

    from refllama.diagnostics.benchmark import PROMPT_TEXT
    from refllama.formats.default_model import default_model_path
    from refllama.formats.gguf import GGUFFile
    from refllama.formats.gguf_llama import config_from_gguf
    from refllama.formats.tokenizer import LlamaTokenizer

    q4_1 = args.model or default_model_path()
    files = make_models(q4_1, args.work)
    selected = [r.strip() for r in args.rows.split(",")] if args.rows else list(ROWS)
    unknown = sorted(set(selected) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; the rows are {list(ROWS)}")
    if any(ROWS[n][2] == "q4_k_m" for n in selected) and not available("llama.cpp"):
        try:
            files["q4_k_m"] = make_q4_k_m(files["f32"], args.threads)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"no Q4_K_M file: {e}", file=sys.stderr)
    gguf = GGUFFile(q4_1)
    tokenizer = LlamaTokenizer.from_gguf_metadata(gguf.metadata, source=q4_1)
    text_ids = tokenizer.encode(PROMPT_TEXT)
    ids = (text_ids * (args.prompt_tokens // len(text_ids) + 1))[:args.prompt_tokens]
    profiled = {r.strip() for r in args.profile.split(",") if r.strip()}
    report: dict[str, Any] = {"machine": machine(), "settings": {
        "threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "rounds": args.rounds, "reps": args.reps, "scoring_prompts": args.scoring_prompts,
        "scoring_tokens": args.scoring_tokens, "scoring_reps": args.scoring_reps, "quick": args.quick,
        "files": {k: str(v) for k, v in files.items()}},
        "rows": {}, "profiles": {}, "bandwidth": {}}

    report["bandwidth"]["before"] = measure_bandwidth(args)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in selected}
    for round_ in range(args.rounds):
        for name in round_order(selected, round_):
            beside = name in BESIDE_ROWS
            before = measure_bandwidth(args) if beside else {}
            result = run_row(name, files, ids, args, profile=name in profiled and round_ == 0, report=report)
            if beside and "error" not in result:
                result["bandwidth_beside"] = [b["gb_per_s"] for b in (before, measure_bandwidth(args))
                                              if "gb_per_s" in b]
            runs[name].append(result)
    report["rows"] = {name: over_rounds(results) for name, results in runs.items()}
    if not args.no_scoring:
        prompts = scoring_prompts(text_ids, args.scoring_prompts, args.scoring_tokens)
        report["scoring"], report["scoring_check"] = run_scoring(prompts, files, args)
    if args.busy_core:
        report["busy"] = run_busy(selected, files, ids, args, report["rows"])
    report["bandwidth"]["after"] = measure_bandwidth(args)
    measured = [b for b in (report["bandwidth"].get(w) for w in ("before", "after")) if b and "gb_per_s" in b]
    if measured:
        report["bandwidth"].update(gb_per_s=max(b["gb_per_s"] for b in measured),
                                   buffer_mib=measured[0]["buffer_mib"])

    if not args.quick and any(ROWS[n][3] == "numba" for n in selected):
        with tempfile.TemporaryDirectory() as cache:
            print("timing the numba JIT (cold, then warm) ...", file=sys.stderr)
            cold = _run_jit(cache, args.threads)
            report["jit"] = {"cold": cold, "warm": _run_jit(cache, args.threads)}

    q4 = report["rows"].get("refllama numba Q4_1", {})
    if "rss_peak_mb" in q4:
        config = config_from_gguf(gguf)
        kv_mb = (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
                 * (args.prompt_tokens + args.new_tokens)) / 2**20
        file_mb = q4_1.stat().st_size / 2**20
        grown = q4["rss_peak_mb"] - q4["rss_base_mb"]
        report["q4_1_rss"] = {"peak_minus_base_mb": grown, "file_mb": file_mb, "kv_mb": kv_mb,
                              "runtime_mb": q4.get("runtime_rss_mb", 0.0),
                              "bound_mb": 1.3 * file_mb + kv_mb, "met": grown <= 1.3 * file_mb + kv_mb}
    report["bounds"] = bounds(report["rows"], report["bandwidth"].get("gb_per_s"))
    report["ratios"] = ratios(report["rows"], report.get("scoring"))
    report["targets"] = targets(report)
    report["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["wall_s"] = time.perf_counter() - began

    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    (args.out / "bench.md").write_text(text)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    if plot(report, args.out / "bench.png"):
        print(f"wrote {args.out / 'bench.png'}", file=sys.stderr)
    print(text)
    return 0


def measure_bandwidth(args: argparse.Namespace) -> dict[str, Any]:
    print("measuring the read bandwidth ...", file=sys.stderr)
    try:
        result = run_child({"task": "bandwidth", "threads": args.threads, "passes": args.bandwidth_passes},
                           args.threads)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"  the bandwidth measurement failed: {e}", file=sys.stderr)
        return {"error": str(e)}
    print(f"  {result['gb_per_s']:.1f} GB/s", file=sys.stderr)
    return result


def run_row(name: str, files: dict[str, Path], ids: list[int], args: argparse.Namespace, profile: bool,
            report: dict[str, Any] | None = None, adaptive: bool = False) -> dict[str, Any]:
    """One row's generation figures from a fresh process, or {"error": why}; its decode profile goes to report."""
    engine, _, kind, backend = ROWS[name]
    why_not = available(engine, backend) or (None if kind in files else f"no {kind} file was made")
    if why_not:
        print(f"skipping {name}: {why_not}", file=sys.stderr)
        return {"error": why_not}
    print(f"running {name} ...", file=sys.stderr)
    payload = {"engine": engine, "backend": backend, "path": str(files[kind]), "ids": ids, "reps": args.reps,
               "new_tokens": args.new_tokens, "threads": args.threads, "profile": profile}
    try:
        result = run_child(payload, args.threads, adaptive=adaptive)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"  {name} failed: {e}", file=sys.stderr)
        return {"error": f"failed: {e}"}
    profiled = result.pop("decode_profile", None)
    if profiled and report is not None:
        report["profiles"][name] = profiled
    print(f"  prefill {result['prefill_tokens_per_s']:.0f} tok/s, decode {result['decode_tokens_per_s']:.1f} "
          f"tok/s", file=sys.stderr)
    return result


def round_order(selected: list[str], round_: int) -> list[str]:
    """The selected rows in the order round `round_` runs them: grouped by precision (f32, q8, q4, q4k: a refllama
    row's ratios are taken against the peer of its precision), each group in the order of `selected` (by default
    ROWS': refllama rows, then the peers, so Q8_0 runs right before q8_0), the whole group reversed on odd rounds;
    then every other row, MLX among them (on Linux a one-thread correctness backend, slow, compared with nothing)."""
    groups = [[name for name in selected if ROWS[name][1] == precision and ROWS[name][3] != "mlx"]
              for precision in PEER]
    if round_ % 2:
        groups = [group[::-1] for group in groups]
    ordered = [name for group in groups for name in group]
    return ordered + [name for name in selected if name not in ordered]


def over_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """A row over its rounds: prefill, decode and time to first token are medians over every repetition of every
    round; load time and memory are the first round's; a round that failed fails the row."""
    failed = next((r for r in results if "error" in r), None)
    if failed is not None:
        return failed
    row = dict(results[0])
    row["repetitions"] = [rep for r in results for rep in r["repetitions"]]
    for key, rep_key in (("prefill_tokens_per_s", "prefill_tokens_per_s"), ("decode_tokens_per_s",
                                                                            "decode_tokens_per_s"),
                         ("time_to_first_token_s", "prefill_s")):
        row[key] = float(np.median([rep[rep_key] for rep in row["repetitions"]]))
    row["rounds"] = len(results)
    row["round_decode_tokens_per_s"] = [float(np.median([rep["decode_tokens_per_s"] for rep in r["repetitions"]]))
                                        for r in results]
    row["bandwidth_beside"] = [r.get("bandwidth_beside", []) for r in results]
    return row


def run_scoring(prompts: list[list[int]], files: dict[str, Path], args: argparse.Namespace
                ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The scoring rows, each from a fresh process, and their first prompt's logits checked against HF's."""
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        saved = {}
        for i, name in enumerate(SCORING):
            engine, _, kind, backend = ROWS[name]
            why_not = available(engine, backend)
            if why_not:
                results[name] = {"error": why_not}
                continue
            print(f"scoring with {name} ...", file=sys.stderr)
            save = Path(scratch) / f"{i}.npy"
            payload = {"task": "score", "engine": engine, "backend": backend, "path": str(files[kind]),
                       "prompts": prompts, "reps": args.scoring_reps, "threads": args.threads, "save": str(save)}
            try:
                results[name] = run_child(payload, args.threads)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"  {name} failed: {e}", file=sys.stderr)
                results[name] = {"error": f"failed: {e}"}
                continue
            saved[name] = save
            print(f"  {results[name]['tokens_per_s']:.0f} tok/s", file=sys.stderr)
        check = cross_check(saved)
    for name, r in results.items():
        if "error" not in r:  # every position's logits, and refllama's as HF's within the bound (where HF ran)
            r["valid"] = r["complete"] and check.get(name, {}).get("within") is not False
    return results, check


BUSY_SETTLE_S = 60


def run_busy(selected: list[str], files: dict[str, Path], ids: list[int], args: argparse.Namespace,
             quiet: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The decode rows again while a spinning process holds one of this process's CPUs: busy / quiet decode. The
    spinner runs BUSY_SETTLE_S first (a machine that is busy stays busy; the 1-minute load average the numba
    backend reads needs that long to show it), and refllama runs with its default thread choice (no
    REFLLAMA_NUM_THREADS)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    out: dict[str, dict[str, Any]] = {}
    try:
        if cpus:
            os.sched_setaffinity(spinner.pid, {cpus[-1]})  # one core, the last this bench may use
        time.sleep(BUSY_SETTLE_S)
        for name in selected:
            if "decode_tokens_per_s" not in quiet.get(name, {}):
                continue
            result = run_row(name, files, ids, args, profile=False, adaptive=True)
            if "error" in result:
                out[name] = {"error": result["error"]}
                continue
            busy, calm = result["decode_tokens_per_s"], quiet[name]["decode_tokens_per_s"]
            out[name] = {"quiet": calm, "busy": busy, "kept": busy / calm,
                         "quiet_ttft_s": quiet[name]["time_to_first_token_s"],
                         "busy_ttft_s": result["time_to_first_token_s"]}
    finally:
        spinner.kill()
        spinner.wait()
    return out


def _run_jit(cache: str, threads: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child-jit", cache], capture_output=True, text=True,
                         env=thread_env(threads), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
