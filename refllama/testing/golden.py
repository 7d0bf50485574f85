"""How close an engine must come to the golden files (transformers' logits, golden/ and tests/fixtures/quant/):
one set of bounds for every backend, the checks that apply them, and which model fixtures there are.

Measured figures behind each bound are in tests/test_golden.py, tests/test_quant_fixtures.py,
tests/test_smollm2.py and each backend's docs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

F32_ATOL = 2e-5  # a float32 engine vs HF float32
F64_ATOL = 1e-12  # a float64 engine vs HF patched to true float64
ARGMAX_MARGIN = 1e-3  # argmax must agree where HF's top-1/top-2 margin exceeds this (below it float32 noise may flip)
HALF_ATOL = {"bfloat16": 0.1, "float16": 0.015}  # half-precision engines vs HF float32 (as far as HF's own)
SMOLLM2_ATOL = 2e-4  # SmolLM2 in float32 vs HF float32 on the same GGUF
SMOLLM2_F64_ATOL = 1e-11  # SmolLM2 in float64 vs HF patched to true float64
# The quantized fixtures (tests/fixtures/quant/). W8A8 with compressed-tensors' formula ("hf" semantics) is not
# continuous in its input: a token whose absmax element is negative sits on the -127.5 rounding tie, so one flipped
# code moves the logits by ~0.1 (tests/test_quant_fixtures.py); everything tie-free is held to F32_ATOL.
W8A8_HF_ATOL = 0.3  # measured 0.08 (float32) / 0.135 (float64)
W8A8_HF_TOP1 = 0.9  # top-1 agreement with HF's argmax, W8A8 "hf" semantics
# Quantized fixtures computed in half precision against the float32 references: as far as the float base fixture's
# own half-precision run (0.077 / 0.011); MLX measured 0.12 / 0.015 (docs/mlx.md).
QUANT_HALF_ATOL = {"bfloat16": 0.2, "float16": 0.03}
W8A8_HALF_ATOL = 0.5  # W8A8 in half precision: rounding the input in half moves many codes by one (MLX: 0.25)


def top2_margin(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def assert_close(ours: np.ndarray, ref: np.ndarray, atol: float) -> np.ndarray:
    """Logits within atol of the reference, and the same argmax wherever its margin is clear; returns that mask."""
    np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)
    clear = top2_margin(ref) > ARGMAX_MARGIN
    np.testing.assert_array_equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])
    return clear


def decode_rows(engine, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits of `ids` from a prefill of `prefill` tokens, then one token at a time through the cache."""
    cache = engine.new_cache(1, len(ids))
    rows = [engine.forward(ids[None, :prefill], cache)[0]]
    rows += [engine.forward(ids[None, t:t + 1], cache)[0] for t in range(prefill, len(ids))]
    return np.concatenate(rows)


def assert_smollm2_logits(logits: np.ndarray, g: dict[str, np.ndarray], prompt: str) -> None:
    """SmolLM2 logits of a golden prompt (golden/smollm2.npz) against HF: the stored positions, every position's
    top-k entries, and the argmax where HF's top-1/top-2 margin is clear."""
    np.testing.assert_allclose(logits[g[f"{prompt}_positions"]], g[f"{prompt}_logits_f32"], rtol=0,
                               atol=SMOLLM2_ATOL)
    top_ids = g[f"{prompt}_topk_ids"].astype(np.int64)
    top = g[f"{prompt}_topk_f32"]
    np.testing.assert_allclose(np.take_along_axis(logits, top_ids, -1), top, rtol=0, atol=SMOLLM2_ATOL)
    clear = top[:, 0] - top[:, 1] > ARGMAX_MARGIN
    np.testing.assert_array_equal(logits.argmax(-1)[clear], top_ids[clear, 0])


def reference_key(g: dict[str, np.ndarray], prompt: str) -> str:
    """The key of a quantized fixture's golden (`g`) that a float32 engine must match tightly: the exact-dequant
    reference where HF's own route was inexact, else HF's logits."""
    return f"logits_{prompt}_f32dequant" if f"logits_{prompt}_f32dequant" in g else f"logits_{prompt}"


def checkout_golden_dir() -> Path | None:
    """The golden/ folder of the refllama checkout this package runs from (an editable install), or None."""
    candidate = Path(__file__).resolve().parent.parent.parent / "golden"
    return candidate if (candidate / "manifest.json").is_file() else None


def golden_fixture_names(directory: str | Path | None = None) -> list[str]:
    """The model fixtures a golden directory's manifest.json records, each a checkpoint with its golden .npz of the
    same name (sampling, chat-template and SmolLM2 files are not among them). A plain function, so that a test
    module can parametrise over it at import: `@pytest.mark.parametrize("name", golden_fixture_names())`.
    `directory` defaults to the refllama checkout's golden/; without one, or without a manifest, the list is empty."""
    directory = checkout_golden_dir() if directory is None else Path(directory)
    manifest = None if directory is None else directory / "manifest.json"
    if manifest is None or not manifest.is_file():
        return []
    return sorted(json.loads(manifest.read_text(encoding="utf-8")).get("fixtures", {}))
