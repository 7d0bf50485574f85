"""refllama against llama.cpp and HF transformers on SmolLM2-135M: one command, one table.

    python tools/bench.py [--model Q4_1.gguf] [--threads 2] [--prompt-tokens 128] [--new-tokens 128] [--reps 3]
                          [--out bench-results] [--work ~/.cache/refllama/bench] [--rows NAME,...]

Rows (each in a fresh process, with every thread pool set to --threads): refllama numpy f32, numba f32, numba
W8A8 (compressed-tensors), numba Q8_0 and Q4_1 (GGUF); llama.cpp (llama-cpp-python) f32, q8_0 and Q4_1 on the same
GGUF files; HF transformers torch f32. A peer that is not installed is skipped with a message (`pip install -e
".[bench]"` in the checkout installs them). Every engine gets the same prompt token ids and decodes greedily without
stopping at eos. Figures are medians over --reps repetitions (refllama/diagnostics/benchmark.py says what one is).

The model files are made once in --work from the Q4_1 GGUF (the installed default model): an F32 GGUF (its
weights dequantized, exactly) and a Q8_0 GGUF of those (gguf-py's quantizer, as llama.cpp's), both with the gguf
package; and a compressed-tensors W8A8 folder (tools/make_quant_golden.py: int8 per-channel weights, dynamic
per-token int8 activations, lm_head float32). So every row runs the same network.

Also measured: the numba kernels' JIT time cold (empty cache directory) and warm (loaded from it), and where one
decode step spends its time (refllama.diagnostics.benchmark.decode_profile). Output: a markdown table on stdout and in
OUT/bench.md, OUT/bench.json, and OUT/bench.png when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    "refllama numba W8A8": ("refllama", "q8", "w8a8", "numba"),
    "refllama numba Q8_0": ("refllama", "q8", "q8_0", "numba"),
    "refllama numba Q4_1": ("refllama", "q4", "q4_1", "numba"),
    # MLX on Linux is the mlx[cpu] wheel (reference BLAS, one thread): a correctness backend here, Metal on a Mac
    "refllama mlx f32": ("refllama", "f32", "f32", "mlx"),
    "llama.cpp f32": ("llama.cpp", "f32", "f32", None),
    "llama.cpp q8_0": ("llama.cpp", "q8", "q8_0", None),
    "llama.cpp Q4_1": ("llama.cpp", "q4", "q4_1", None),
    "HF torch f32": ("hf", "f32", "f32", None),
}
PEER = {"f32": "llama.cpp f32", "q8": "llama.cpp q8_0", "q4": "llama.cpp Q4_1"}

# The targets: (row, metric, reference row, minimum ratio)
TARGETS = [
    ("refllama numba W8A8", "decode", "llama.cpp q8_0", 0.8),
    ("refllama numba Q8_0", "decode", "llama.cpp q8_0", 0.8),
    ("refllama numba Q4_1", "decode", "llama.cpp Q4_1", 0.6),
    ("refllama numba f32", "decode", "llama.cpp f32", 0.7),
    ("refllama numba f32", "decode", "HF torch f32", 2.0),
    ("refllama numpy f32", "decode", "HF torch f32", 1.0),
    ("refllama numba W8A8", "prefill", "llama.cpp q8_0", 0.5),
    ("refllama numba f32", "prefill", "HF torch f32", 1.0),
]


# --- model files ---------------------------------------------------------------------------------------------------

def make_models(q4_1: Path, work: Path) -> dict[str, Path]:
    """The Q4_1 GGUF plus F32 and Q8_0 GGUFs of the same weights and a W8A8 folder, made once in `work`."""
    work.mkdir(parents=True, exist_ok=True)
    files = {"q4_1": q4_1, "f32": work / f"{q4_1.stem}.F32.gguf", "q8_0": work / f"{q4_1.stem}.Q8_0.gguf",
             "w8a8": work / f"{q4_1.stem}.W8A8"}
    for kind in ("f32", "q8_0"):
        if not files[kind].exists():
            print(f"making {files[kind]} ...", file=sys.stderr)
            _requantize_gguf(q4_1, files[kind], kind)
    if not (files["w8a8"] / "config.json").exists():
        print(f"making {files['w8a8']} ...", file=sys.stderr)
        sys.path.insert(0, str(ROOT / "tools"))
        import make_quant_golden

        make_quant_golden.write_refllama(files["w8a8"])
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


# --- one engine in a child process -----------------------------------------------------------------------------

def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one engine, run the timed generations, report throughput, load time and memory (MiB)."""
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
    base = benchmark.rss_mb()
    benchmark.reset_peak_rss()
    start = time.perf_counter()
    engine = refllama.load(path, backend=spec["backend"], dtype="float32")
    load_s, loaded = time.perf_counter() - start, benchmark.rss_mb()
    start = time.perf_counter()
    benchmark.generate_timed(engine, np.array(spec["ids"][:8]), 2)
    first_call_s = time.perf_counter() - start
    result = benchmark.measure(engine, prompt, new, reps).to_dict()
    result.update(load_s=load_s, first_call_s=first_call_s, rss_base_mb=base, rss_loaded_mb=loaded,
                  rss_peak_mb=benchmark.peak_rss_mb())
    if spec.get("profile"):
        result["decode_profile"] = benchmark.decode_profile(engine, prompt)
    return result


def _timed_reps(run: Any, prompt: int, new: int, reps: int) -> dict[str, Any]:
    run(8, 4)  # untimed warm-up
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
                  version=llama_cpp.__version__)
    return result


def _child_hf(spec: dict[str, Any], path: str, ids: np.ndarray, new: int, reps: int) -> dict[str, Any]:
    import torch
    import transformers

    from refllama.diagnostics import benchmark

    torch.set_num_threads(spec["threads"])
    base = benchmark.rss_mb()
    benchmark.reset_peak_rss()
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name,
                                                              dtype=torch.float32)
    model.eval()
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
                  version=f"transformers {transformers.__version__}, torch {torch.__version__}")
    return result


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

def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "REFLLAMA_NUM_THREADS"):
        env[key] = str(threads)
    return env


def run_child(payload: dict[str, Any], threads: int, timeout: float = 3600) -> dict[str, Any]:
    """Run this script as a child with the payload; its last stdout line is the JSON result."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(payload)], capture_output=True, text=True,
                         env=thread_env(threads), timeout=timeout)
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


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each refllama row's prefill and decode tokens/s over llama.cpp's at its precision class and over HF f32."""
    out = {}
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
    return out


def targets(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for row, metric, reference, minimum in TARGETS:
        ours, theirs = rows.get(row, {}), rows.get(reference, {})
        key = f"{metric}_tokens_per_s"
        ratio = ours[key] / theirs[key] if key in ours and key in theirs else None
        found.append({"row": row, "metric": metric, "reference": reference, "target": minimum, "ratio": ratio,
                      "met": None if ratio is None else ratio >= minimum})
    return found


def markdown(report: dict[str, Any]) -> str:
    rows, m, s = report["rows"], report["machine"], report["settings"]
    load = m["load_average"]
    lines = [f"# refllama bench: SmolLM2-135M, {s['threads']} threads, {s['prompt_tokens']}-token prompt, "
             f"{s['new_tokens']} new tokens, median of {s['reps']}", "",
             f"{m['cpu']}, {m['cores']} cores; load average before/after: "
             f"{', '.join(f'{x:.2f}' for x in load or [])} / "
             f"{', '.join(f'{x:.2f}' for x in report.get('load_average_after') or [])}", "",
             "| engine | prefill tok/s | decode tok/s | TTFT ms | load s | RSS loaded MiB | peak RSS MiB | "
             "peak - base MiB | prefill / llama.cpp | decode / llama.cpp | prefill / HF | decode / HF |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        r = rows.get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | skipped: {r['error']} |" + " |" * 10)
            continue
        q = report["ratios"].get(name, {})

        def fmt(key: str, q: dict = q) -> str:
            return f"{q[key]:.2f}x" if key in q else ""

        lines.append(f"| {name} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{1e3 * r['time_to_first_token_s']:.0f} | {r['load_s']:.2f} | {r['rss_loaded_mb']:.0f} | "
                     f"{r['rss_peak_mb']:.0f} | {r['rss_peak_mb'] - r['rss_base_mb']:.0f} | "
                     f"{fmt('prefill / llama.cpp')} | {fmt('decode / llama.cpp')} | {fmt('prefill / HF')} | "
                     f"{fmt('decode / HF')} |")
    lines += ["", "## Targets (issue 7)", "", "| target | measured | met |", "|---|---|---|"]
    for t in report["targets"]:
        measured = "n/a (a row is missing)" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        met = "" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['row']} {t['metric']} >= {t['target']}x {t['reference']} | {measured} | {met} |")
    rss = report.get("q4_1_rss")
    if rss:
        lines += ["", f"Q4_1 GGUF, numba: peak RSS minus the pre-load baseline {rss['peak_minus_base_mb']:.0f} MiB "
                  f"against 1.3 x file ({rss['file_mb']:.1f} MiB) + KV cache ({rss['kv_mb']:.1f} MiB) = "
                  f"{rss['bound_mb']:.0f} MiB: {'met' if rss['met'] else 'not met'} (the difference includes the "
                  "tokenizer's Python objects)."]
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
                 f"{s['new_tokens']} new tokens (median of {s['reps']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-jit", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help="a Q4_1 GGUF (default: the installed SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "refllama" / "bench",
                        help="where the F32/Q8_0 GGUFs and the W8A8 folder are made once")
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--profile", default="refllama numba Q4_1,refllama numba W8A8,refllama numba f32",
                        help="rows whose decode step is profiled by operation")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.child_jit:
        print(json.dumps(child_jit(args.child_jit)))
        return 0
    if args.reps < 3:
        print("note: fewer than 3 repetitions", file=sys.stderr)

    from refllama.formats.default_model import default_model_path
    from refllama.formats.gguf import GGUFFile
    from refllama.formats.gguf_llama import config_from_gguf
    from refllama.formats.tokenizer import LlamaTokenizer

    q4_1 = args.model or default_model_path()
    files = make_models(q4_1, args.work)
    gguf = GGUFFile(q4_1)
    tokenizer = LlamaTokenizer.from_gguf_metadata(gguf.metadata, source=q4_1)
    from refllama.diagnostics.benchmark import PROMPT_TEXT

    text_ids = tokenizer.encode(PROMPT_TEXT)
    ids = (text_ids * (args.prompt_tokens // len(text_ids) + 1))[:args.prompt_tokens]
    selected = [r.strip() for r in args.rows.split(",")] if args.rows else list(ROWS)
    profiled = {r.strip() for r in args.profile.split(",") if r.strip()}
    report: dict[str, Any] = {"machine": machine(), "settings": {
        "threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "reps": args.reps, "files": {k: str(v) for k, v in files.items()}}, "rows": {}, "profiles": {}}

    for name in selected:
        engine, _, kind, backend = ROWS[name]
        why_not = available(engine, backend)
        if why_not:
            print(f"skipping {name}: {why_not}", file=sys.stderr)
            report["rows"][name] = {"error": why_not}
            continue
        print(f"running {name} ...", file=sys.stderr)
        payload = {"engine": engine, "backend": backend, "path": str(files[kind]), "ids": ids, "reps": args.reps,
                   "new_tokens": args.new_tokens, "threads": args.threads, "profile": name in profiled}
        try:
            result = run_child(payload, args.threads)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"  {name} failed: {e}", file=sys.stderr)
            report["rows"][name] = {"error": f"failed: {e}"}
            continue
        profile = result.pop("decode_profile", None)
        if profile:
            report["profiles"][name] = profile
        report["rows"][name] = result
        print(f"  prefill {result['prefill_tokens_per_s']:.0f} tok/s, decode {result['decode_tokens_per_s']:.1f} "
              f"tok/s", file=sys.stderr)

    if any(ROWS[n][3] == "numba" for n in selected):
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
                              "bound_mb": 1.3 * file_mb + kv_mb, "met": grown <= 1.3 * file_mb + kv_mb}
    report["ratios"] = ratios(report["rows"])
    report["targets"] = targets(report["rows"])
    report["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    (args.out / "bench.md").write_text(text)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    if plot(report, args.out / "bench.png"):
        print(f"wrote {args.out / 'bench.png'}", file=sys.stderr)
    print(text)
    return 0


def _run_jit(cache: str, threads: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child-jit", cache], capture_output=True, text=True,
                         env=thread_env(threads), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
