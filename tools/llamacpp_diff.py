"""The per-layer diff of llama.cpp against refllama's float64 reference on SmolLM2-135M-Instruct (docs/oracle.md).

Makes an F32 and a Q8_0 GGUF from the installed Q4_1 one in --work (tools/bench.py's converter: F32 holds the Q4_1
weights dequantized exactly, Q8_0 re-quantizes those), traces llama.cpp on each through `refllama trace --engine
llamacpp` in a child process (so that a llama.cpp crash is a row of the table, not the end of the run), with its
default settings (f16 KV cache, flash attention "auto") and with an f32 KV cache and flash attention off. Each trace
is compared with refllama's float64 trace of the same GGUF (Q8_0 dequantized exactly), and the table gives the
NMSE of selected tensors and the first tensor beyond the `f32` profile.

    python tools/llamacpp_diff.py [--work DIR] [--ids 504,3575,...]   # needs llama-cpp-python and gguf
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

# "The capital of France is Paris. The capital of Germany is" in SmolLM2's tokenizer
IDS = [504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4521, 314]
SETTINGS = {"f32 KV, no flash attention": ["--kv-cache", "f32", "--flash-attention", "off"],
            "f32 KV, flash attention": ["--kv-cache", "f32", "--flash-attention", "on"],
            "f16 KV, no flash attention": ["--kv-cache", "f16", "--flash-attention", "off"],
            "default (f16 KV, flash attention auto)": []}
SHOWN = ["layers.0.q", "layers.0.v", "layers.0.attention_output", "layers.0.mlp_output", "layers.29.residual",
         "logits"]


def gguf_files(work: Path) -> dict[str, Path]:
    import bench

    from refllama.formats.default_model import default_model_path

    q4_1 = default_model_path()
    work.mkdir(parents=True, exist_ok=True)
    files = {"F32": work / f"{q4_1.stem}.F32.gguf", "Q8_0": work / f"{q4_1.stem}.Q8_0.gguf"}
    for kind, path in files.items():
        if not path.exists():
            bench._requantize_gguf(q4_1, path, kind.lower())
    return files


def llamacpp(gguf: Path, ids: list[int], flags: list[str], out: Path) -> str | None:
    """Trace llama.cpp into `out` in a child process; None, or why there is no trace."""
    r = subprocess.run([sys.executable, "-m", "refllama", "trace", str(gguf), "--engine", "llamacpp", "--ids",
                        ",".join(map(str, ids)), "--out", str(out), *flags], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    if r.returncode == -4:
        return "crashed: SIGILL (illegal instruction)"
    return f"failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:] or ''}"


def main() -> int:
    import refllama
    from refllama.testing import compare_traces, load_trace

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("llamacpp-diff"), help="folder for the GGUFs and traces")
    parser.add_argument("--ids", default=",".join(map(str, IDS)))
    args = parser.parse_args()
    ids = [int(i) for i in args.ids.split(",")]
    columns, firsts = {}, {}
    for kind, gguf in gguf_files(args.work).items():
        reference = refllama.load(gguf, dtype="float64").trace(ids)
        for setting, flags in SETTINGS.items():
            label = f"{kind}, {setting}"
            out = args.work / f"llamacpp-{kind}-{len(columns)}.npz"
            problem = llamacpp(gguf, ids, flags, out)
            if problem:
                columns[label], firsts[label] = {}, problem
                print(f"{label}: {problem}", file=sys.stderr)
                continue
            trace, manifest = load_trace(out)
            rows = {r.name: r for r in compare_traces(reference, trace, "f32", allow_missing=True)}
            columns[label] = rows
            firsts[label] = next((r.name for r in rows.values() if not r.ok), "none")
            print(f"{label}: {len(trace)} tensors, missing {manifest.get('missing')}", file=sys.stderr)
    print(f"NMSE against refllama float64 on the same GGUF, {len(ids)} tokens, llama-cpp-python "
          f"{manifest_version()}:\n")
    print("| GGUF, llama.cpp settings | " + " | ".join(f"`{n}`" for n in SHOWN) + " | logits max \\|diff\\| | "
          "first tensor beyond `f32` |")
    print("| --- |" + " --- |" * (len(SHOWN) + 2))
    for label, rows in columns.items():
        cells = [f"{rows[n].nmse:.2g}" if n in rows else "-" for n in SHOWN]
        cells.append(f"{rows['logits'].max_abs:.2g}" if "logits" in rows else "-")
        print(f"| {label} | " + " | ".join(cells) + f" | {firsts[label]} |")
    return 0


def manifest_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


if __name__ == "__main__":
    sys.exit(main())
