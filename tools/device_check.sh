#!/usr/bin/env bash
# The cupy backend on a real GPU: the golden suite on backend="cupy", then timings. One prepared run for the
# `device` tool (docs/cupy.md, "Running the device check"); it installs nothing from the network: the device image
# has CuPy, NumPy and PyTorch, and this repository is made importable through a symlinked package in /tmp.
#
#   tools/device_check.sh          tests, then benchmarks (about 5 minutes on an H200; capped under 8)
#   tools/device_check.sh tests    only the tests
#   tools/device_check.sh bench    only the benchmarks
#   tools/device_check.sh stash    keep carried .devcarry/* files in /tmp/refllama-stash for a later call
#
# SmolLM2 (94 MB) does not fit into one call's 64 MiB transfer with the tree. Split it into three parts under
# .devcarry/ (git-ignored), stash two of them with two short calls, and carry the third with the real run: the
# parts are joined and checked against the sha256 in golden/quant_manifest.json. Without them, the SmolLM2 golden
# tests skip and SmolLM2 is timed as a synthetic checkpoint of its shape.
#
# Results go to $OUT (the device tool's output folder; ./device-out elsewhere): device_check.log, junit.xml,
# bench.json, bench.md.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/device-out}
mkdir -p "$OUT"
STASH=/tmp/refllama-stash
MODE=${1:-all}

if [ "$MODE" = stash ]; then
    mkdir -p "$STASH" && cp -v .devcarry/* "$STASH"/ 2>&1 && ls -la "$STASH"
    exit 0
fi

exec > >(tee -a "$OUT/device_check.log") 2>&1
START=$(date +%s)
echo "== refllama cupy device check ($MODE), $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
PY=${PYTHON:-python3}

# refllama importable without installing: refllama/ plus backends/ as refllama.backends (the package-dir mapping
# of pyproject.toml), as symlinks.
SHADOW=/tmp/refllama-shadow
rm -rf "$SHADOW" && mkdir -p "$SHADOW/refllama"
for entry in "$ROOT"/refllama/*; do ln -s "$entry" "$SHADOW/refllama/$(basename "$entry")"; done
ln -s "$ROOT/backends" "$SHADOW/refllama/backends"
# PYTHONSAFEPATH: `python -m pytest` and `python -` must not put the checkout first on sys.path, where refllama/ has
# no backends/.
export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
export REFLLAMA_CACHE_DIR=/tmp/refllama-cache PYTHONUNBUFFERED=1 CI=1 PYTHONDONTWRITEBYTECODE=1
"$PY" -c "import sys, cupy, numpy, refllama, refllama.backends.cupy_kernels as ck
print('python', sys.version.split()[0], '| cupy', cupy.__version__, '| numpy', numpy.__version__,
      '| refllama from', refllama.__file__, '| NVRTC', ck.nvrtc_version())
try:
    print('CUDA runtime', cupy.cuda.runtime.runtimeGetVersion(), '| device sm_' + cupy.cuda.Device().compute_capability)
except Exception as e:
    print('no usable CUDA device:', e)" || { echo "FAIL: cannot import cupy/refllama"; exit 1; }

# SmolLM2 from carried or stashed parts (see above).
if compgen -G ".devcarry/smollm2.gguf.part-*" > /dev/null || compgen -G "$STASH/smollm2.gguf.part-*" > /dev/null; then
    parts=$( (ls .devcarry/smollm2.gguf.part-* 2>/dev/null; ls "$STASH"/smollm2.gguf.part-* 2>/dev/null) |
             awk -F/ '{print $NF "\t" $0}' | sort -u -k1,1 | cut -f2)
    # shellcheck disable=SC2086
    cat $parts > /tmp/smollm2.gguf
    want=$("$PY" -c "import json; print(json.load(open('golden/quant_manifest.json'))['smollm2_w8a8']['gguf_sha256'])")
    got=$(sha256sum /tmp/smollm2.gguf | cut -d' ' -f1)
    if [ "$want" = "$got" ]; then
        export REFLLAMA_SMOLLM2_GGUF=/tmp/smollm2.gguf
        echo "SmolLM2 GGUF assembled from $(echo "$parts" | wc -l) parts, sha256 ok"
    else
        echo "SmolLM2 parts present but incomplete or wrong (sha256 $got): SmolLM2 tests will skip"
    fi
else
    echo "SmolLM2 GGUF not carried: its golden tests skip; it is timed as a synthetic checkpoint of its shape"
fi

status=0
if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
    echo "== tests (capped at 300 s)"
    timeout 300 "$PY" -m pytest -p no:cacheprovider -q -rfEs --durations=12 --junitxml="$OUT/junit.xml" \
        tests/test_cupy_backend.py tests/test_cupy_compile.py tests/test_cupy_emulated.py tests/test_cupy_kernels.py
    status=$?
    echo "== tests exit status $status after $(( $(date +%s) - START )) s"
fi

if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
    echo "== benchmarks (capped at 170 s)"
    timeout 170 "$PY" - <<'PY'
"""Timings: D2D copy bandwidth, the GEMV kernels alone, host cost per launch, prefill and decode end to end."""
import json
import os
import statistics
import time
from pathlib import Path

import cupy as cp
import numpy as np

import refllama
from refllama.backends import get_backend
from refllama.config import LlamaConfig
from refllama.dtypes import DataType
from refllama.formats.ggml_quants import GGMLType
from refllama.quant.gguf_blocks import GGUFBlockWeight
from refllama.quant.packing import pack_rows
from refllama.quant.types import ActivationQuant, Int8Weight, PackedIntWeight
from refllama.formats.checkpoint import expected_shapes
from refllama.model.weights import Linear

OUT = Path(os.environ["OUT"])
results: dict = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "cupy": cp.__version__}
rows: list[str] = []


def events_time(fn, reps: int) -> float:
    """Seconds per call of fn, GPU time between events around `reps` calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / 1e3 / reps


# 1. the bandwidth ceiling: cudaMemcpy device to device, bytes read + written
n = 1 << 31
src, dst = cp.empty(n, cp.uint8), cp.empty(n, cp.uint8)
t = events_time(lambda: dst.data.copy_from_device_async(src.data, n), 20)
copy_bw = 2 * n / t
results["copy_bandwidth_GBps"] = copy_bw / 1e9
print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
del src, dst

# 2. the weight-streaming kernels alone, GPU-bound (matrices of 64-512 MB)
xp32, xp16 = get_backend("cupy", "float32"), get_backend("cupy", "bfloat16")
rng = np.random.default_rng(0)
kernel_rows = []


def kernel(label, xp, x, layer, nbytes):
    t = events_time(lambda: xp.linear(x, layer), 30)
    frac = nbytes / t / copy_bw
    kernel_rows.append({"kernel": label, "us": t * 1e6, "GBps": nbytes / t / 1e9, "of_copy_bw": frac})
    print(f"  {label:44s} {t * 1e6:8.1f} us  {nbytes / t / 1e9:7.0f} GB/s  {frac:5.1%} of copy")


N, K = 16384, 8192
for xp, name in ((xp32, "float32"), (xp16, "bfloat16")):
    w = xp.asarray(rng.standard_normal((N, K), dtype=np.float32) * 0.02)
    for M in (1, 8):
        kernel(f"gemv {name} [{N}x{K}] M={M}", xp, xp.asarray(rng.standard_normal((M, K))), Linear(w),
               w.nbytes)
    del w
codes = rng.integers(0, 16, (N, K))
packed = PackedIntWeight(pack_rows(codes, 4), rng.uniform(0.01, 0.02, (N, K // 128)).astype(np.float32), 4, K,
                         group_size=128)
for M in (1, 8):
    kernel(f"dequant_gemv p4 g128 [{N}x{K}] M={M}", xp32, xp32.asarray(rng.standard_normal((M, K))),
           Linear(packed), N * K // 2 + packed.scale.nbytes)
q8 = Int8Weight(rng.integers(-127, 128, (N, K), dtype=np.int8), rng.uniform(0.01, 0.02, (N, 1)).astype(np.float32),
                activation=ActivationQuant("hf"))
for M in (1, 8):
    kernel(f"W8A8 int8 dp4a [{N}x{K}] M={M}", xp32, xp32.asarray(rng.standard_normal((M, K))), Linear(q8),
           N * K)
blocks = np.zeros((N, K // 32), dtype=np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]))
blocks["d"], blocks["qs"] = 0.01, rng.integers(0, 256, blocks["qs"].shape)
q41 = GGUFBlockWeight(blocks.view(np.uint8).reshape(N, -1), GGMLType.Q4_1, (N, K))
kernel(f"GGUF Q4_1 (p4m) [{N}x{K}] M=1", xp32, xp32.asarray(rng.standard_normal((1, K))), Linear(q41),
       N * K // 2 + 2 * N * (K // 32) * 4)
results["kernels"] = kernel_rows
del packed, q8, q41, codes, blocks
cp.get_default_memory_pool().free_all_blocks()

# 3. host cost of one launch (nothing else running): the floor of a decode step made of many small operations
x = xp32.asarray(rng.standard_normal((1, 1, 2048)))
w = xp32.asarray(np.ones(2048))
for _ in range(100):
    xp32.rms_norm(x, w, 1e-5)
cp.cuda.Device().synchronize()
t0 = time.perf_counter()
for _ in range(2000):
    xp32.rms_norm(x, w, 1e-5)
cp.cuda.Device().synchronize()
launch_us = (time.perf_counter() - t0) / 2000 * 1e6
results["host_us_per_rms_norm_call"] = launch_us
print(f"host time per backend.rms_norm call (one kernel launch): {launch_us:.1f} us")


# 4. end to end: synthetic checkpoints made here (random bf16 weights), and SmolLM2 when carried
def write_checkpoint(folder: Path, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    shapes = expected_shapes(LlamaConfig.from_dir(folder))
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, shape in shapes.items():
            count = int(np.prod(shape))
            if name.endswith("norm.weight"):
                bits = cp.full(count, 0x3F80, dtype=cp.uint16)  # 1.0
            else:
                values = cp.random.standard_normal(count, dtype=cp.float32) * 0.02
                bits = (values.view(cp.uint32) >> 16).astype(cp.uint16)  # truncated to bfloat16: random anyway
            f.write(cp.asnumpy(bits).tobytes())


LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
             tie_word_embeddings=True, attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
             torch_dtype="bfloat16")
SMOLLM2 = dict(LLAMA, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
               rope_theta=100000.0)
LLAMA_1B = dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def decode_bytes(engine, cache_len: float) -> float:
    """HBM bytes one decode step reads: every weight once (a tied lm_head is the embedding table; an untied
    table gives one row), plus the cached keys and values."""
    c = engine.config
    total = 0
    for t in engine.model.weights.tensors():
        total += t.nbytes
    if not c.tie_word_embeddings:
        total -= engine.model.weights.embeddings.nbytes if hasattr(engine.model.weights.embeddings, "nbytes") else 0
    itemsize = np.dtype(engine.backend.np_dtype).itemsize
    return total + 2 * c.num_hidden_layers * c.num_key_value_heads * cache_len * c.head_dim * itemsize


def run(label: str, engine, prompt_len: int = 128, new: int = 128, reps: int = 3) -> None:
    model, xp = engine.model, engine.backend
    V = engine.config.vocab_size
    prompt = np.random.default_rng(1).integers(0, V, prompt_len)
    warm = engine.new_cache(1, 16)
    model.forward(prompt[None, :8], warm)
    for _ in range(4):
        xp.to_numpy(model.forward(np.array([[1]]), warm)[0, -1])
    counter = {"launches": 0}
    launch = xp.kernels.launch

    def counting(*args):
        counter["launches"] += 1
        return launch(*args)

    prefill, decode = [], []
    for rep in range(reps):
        cache = engine.new_cache(1, prompt_len + new)
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        token = int(np.argmax(xp.to_numpy(model.forward(prompt[None], cache)[0, -1])))
        prefill.append(time.perf_counter() - t0)
        xp.kernels.launch = counting if rep == 0 else launch
        t0 = time.perf_counter()
        for _ in range(new):
            token = int(np.argmax(xp.to_numpy(model.forward(np.array([[token]]), cache)[0, -1])))
        decode.append((time.perf_counter() - t0) / new)
        xp.kernels.launch = launch
    step = statistics.median(decode)
    nbytes = decode_bytes(engine, prompt_len + new / 2)
    row = {"model": label, "dtype": str(xp.dtype.value), "prefill_tok_s": prompt_len / statistics.median(prefill),
           "decode_tok_s": 1 / step, "decode_ms_per_step": step * 1e3, "bytes_per_step_MB": nbytes / 1e6,
           "achieved_GBps": nbytes / step / 1e9, "of_copy_bw": nbytes / step / copy_bw,
           "kernel_launches_per_step": counter["launches"] / new,
           "host_floor_ms": counter["launches"] / new * launch_us / 1e3}
    results.setdefault("end_to_end", []).append(row)
    print(f"  {label:28s} {row['dtype']:8s} prefill {row['prefill_tok_s']:8.0f} tok/s | decode "
          f"{row['decode_tok_s']:6.0f} tok/s ({row['decode_ms_per_step']:.2f} ms/step, "
          f"{row['achieved_GBps']:.0f} GB/s = {row['of_copy_bw']:.1%} of copy; "
          f"{row['kernel_launches_per_step']:.0f} own launches/step)")


work = Path("/tmp/refllama-bench")
for label, cfg in (("SmolLM2-135M-shaped", SMOLLM2), ("Llama-3.2-1B-shaped", LLAMA_1B)):
    folder = work / label
    t0 = time.perf_counter()
    write_checkpoint(folder, cfg)
    print(f"wrote {label} (bf16, random) in {time.perf_counter() - t0:.1f} s")
    for dtype in ("bfloat16", "float32"):
        t0 = time.perf_counter()
        engine = refllama.load(folder, backend="cupy", dtype=dtype)
        print(f"  loaded {label} {dtype} in {time.perf_counter() - t0:.1f} s")
        run(label, engine)
        del engine
        cp.get_default_memory_pool().free_all_blocks()
gguf = os.environ.get("REFLLAMA_SMOLLM2_GGUF")
if gguf:
    run("SmolLM2-135M Q4_1 GGUF", refllama.load(gguf, backend="cupy", dtype="float32"))

(OUT / "bench.json").write_text(json.dumps(results, indent=1))
lines = ["| model | dtype | prefill tok/s | decode tok/s | ms/step | GB/s | of copy BW | launches/step |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for r in results["end_to_end"]:
    lines.append(f"| {r['model']} | {r['dtype']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.0f} | "
                 f"{r['decode_ms_per_step']:.2f} | {r['achieved_GBps']:.0f} | {r['of_copy_bw']:.1%} | "
                 f"{r['kernel_launches_per_step']:.0f} |")
lines += ["", "| kernel alone | us | GB/s | of copy BW |", "| --- | --- | --- | --- |"]
lines += [f"| {k['kernel']} | {k['us']:.1f} | {k['GBps']:.0f} | {k['of_copy_bw']:.1%} |" for k in kernel_rows]
lines += ["", f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write); host time per launch {launch_us:.1f} us"]
(OUT / "bench.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
    bench=$?
    echo "== benchmarks exit status $bench"
    [ $status -eq 0 ] && status=$bench
fi
echo "== done in $(( $(date +%s) - START )) s, exit status $status"
exit $status
