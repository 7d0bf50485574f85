"""Print how closely refllama's numpy backend matches the committed golden files, per fixture (for notes/docs).

    python tools/report_golden.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import refllama

ROOT = Path(__file__).resolve().parent.parent
MARGIN = 1e-3


def main() -> None:
    manifest = json.loads((ROOT / "golden" / "manifest.json").read_text())
    lengths = manifest["sequence_lengths"]
    print("| fixture | f64 vs HF pure f64 | f64 vs HF stock f64 | f32 vs HF f32 | f32 argmax agreement | near-ties "
          "(margin <= 1e-3) | greedy f32 / f64 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in sorted(manifest["fixtures"]):
        with np.load(ROOT / "golden" / f"{name}.npz") as g:
            g = dict(g)
        e32 = refllama.load(ROOT / "tests" / "fixtures" / name, dtype="float32")
        e64 = refllama.load(ROOT / "tests" / "fixtures" / name, dtype="float64")
        d64 = d32 = 0.0
        agree = total = ties = 0
        for n in lengths:
            ids = g[f"ids_{n}"]
            d64 = max(d64, float(np.abs(e64.logits(ids) - g[f"logits_{n}_f64"]).max()))
            ours, ref = e32.logits(ids), g[f"logits_{n}_f32"]
            d32 = max(d32, float(np.abs(ours - ref).max()))
            top2 = np.sort(ref, -1)[:, -2:]
            clear = top2[:, 1] - top2[:, 0] > MARGIN
            ties += int((~clear).sum())
            agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
            total += len(ids)
        n = max(lengths)
        stock = float(np.abs(e64.logits(g[f"ids_{n}"]) - g[f"logits_{n}_f64stock"]).max())
        greedy = (e32.generate_ids(g["ids_10"], 16) == g["greedy_f32"].tolist(),
                  e64.generate_ids(g["ids_10"], 16) == g["greedy_f64"].tolist())
        print(f"| {name} | {d64:.1e} | {stock:.1e} | {d32:.1e} | {agree}/{total} | {ties} | "
              f"{'identical' if all(greedy) else greedy} |")


if __name__ == "__main__":
    main()
