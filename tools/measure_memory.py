"""Measure peak RSS growth of load + generate and compare it with refllama's memory estimate.

Each model runs in a fresh subprocess: imports and BLAS are warmed up on another model first, the peak-RSS
counter is reset (/proc/self/clear_refs), then the model is loaded and generates; growth = peak RSS - RSS
before loading. Linux only.

    python tools/measure_memory.py [--json]         # every golden fixture and SmolLM2 (if installed)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import ctypes, json, sys
ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: no 2 MB huge pages inflating RSS
import numpy as np
import refllama
from refllama.diagnostics.diagnostic import ModelDiagnostic
from refllama.diagnostics.memory import estimate

def status(key):
    return int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) * 1024

path, prompt_len, new, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[5])
from refllama import GenerationRequest
warm = refllama.load(sys.argv[4])  # the same workload on another model: BLAS and NumPy set up their buffers
warm.generate([GenerationRequest(token_ids=[i % 64 for i in range(prompt_len)], max_new_tokens=new)] * batch)
del warm
import ctypes, gc
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the model cannot reuse it unseen
diag = ModelDiagnostic.analyze_directory(path)
rng = np.random.default_rng(0)
requests = [GenerationRequest(token_ids=[int(i) for i in rng.integers(0, diag.config.vocab_size, prompt_len)],
                              max_new_tokens=new, stop_token_ids=[]) for _ in range(batch)]
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak to the current RSS
before = status('VmRSS')
engine = refllama.load(path)
engine.generate(requests)
growth = status('VmHWM') - before
predicted = estimate(diag.config, diag.weight_info, context_length=prompt_len + new, prefill_tokens=prompt_len,
                     batch_size=batch, vocab_entries=diag.tokenizer_info.vocab_size or 0)
print(json.dumps({"growth": growth, "predicted": predicted.total_estimated,
                  "weights": predicted.model_weights, "kv_cache": predicted.kv_cache,
                  "activations": predicted.activation_memory, "overhead": predicted.runtime_overhead}))
"""


def measure(path: Path, prompt_len: int = 96, new_tokens: int = 16, batch: int = 32) -> dict:
    """Growth vs prediction for a batch of `batch` random prompts (the tiny fixtures need a batch for the
    prediction to outweigh the allocator's noise of a few hundred KiB)."""
    warm = ROOT / "tests" / "fixtures" / "gelu"
    if path.suffix != ".gguf":
        limit = json.loads((path / "config.json").read_text()).get("max_position_embeddings", 2048)
        prompt_len = min(prompt_len, limit - new_tokens)
        batch = max(batch, batch * 96 // prompt_len)  # short contexts: more rows, the same amount of work
    # Arrays of 16 KiB and more get their own mappings, returned to the system when freed: the tiny fixtures'
    # arrays would otherwise reuse heap memory freed earlier and hide from RSS (or fragment it and inflate it).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(prompt_len), str(new_tokens), str(warm),
                          str(batch)],
                         capture_output=True, text=True, check=True, timeout=600, env=env)
    result = json.loads(out.stdout)
    result["ratio"] = result["growth"] / result["predicted"]
    return result


def models() -> dict[str, Path]:
    found = {p.name: p for p in sorted((ROOT / "tests" / "fixtures").iterdir()) if (p / "config.json").is_file()}
    sys.path.insert(0, str(ROOT))
    from refllama.errors import CheckpointError
    from refllama.formats.default_model import default_model_path

    try:
        found["smollm2"] = default_model_path()
    except CheckpointError as e:
        print(f"(SmolLM2 skipped: {e})", file=sys.stderr)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {name: measure(path, batch=1 if name == "smollm2" else 32) for name, path in models().items()}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("| model | predicted | measured growth | measured / predicted |")
    print("| --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['predicted'] / 2**20:.2f} MiB | {r['growth'] / 2**20:.2f} MiB | {r['ratio']:.3f} |")


if __name__ == "__main__":
    main()
