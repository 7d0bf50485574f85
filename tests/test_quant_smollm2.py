"""SmolLM2-135M compressed-tensors W8A8, made in a temporary folder by tools/make_quant_golden.py, against HF.

The checkpoint is never committed: refllama's writer makes it from the installed GGUF in ~2 s, and its tensors
must hash to the digests golden/quant_manifest.json recorded from the checkpoint compressed-tensors itself wrote
(bit for bit the library's). golden/quant_smollm2_w8a8.npz holds HF transformers' float32 logits on it.

Measured (numpy, float32, "hf" semantics), over the chat (42 tokens) and code (72 tokens) prompts:
* layer-0 q_proj from HF's own input: codes and scales identical, output within 2.9e-6 (|y| <= 9.4);
* whole model: top-16 logits within 3.8 of HF, KL(HF || ours) <= 0.075 at the full-logit positions, top-1
  agreement 0.905 / 0.917; greedy continuation identical (8 tokens to eos).
The whole-model gap is the -127.5 tie (tests/test_quant_fixtures.py) amplified by SmolLM2's activation outliers:
on a single token, our forward first disagrees with HF's at layer 10's down_proj input, whose absmax element
lands on x/s = -127.49999 in HF and -127.50001 here (inputs 1.3e-6 apart, relative); that one code moves the
layer's output by 1/128 of its largest input, 90 of the remaining 125 Linears then see different codes, and the
logits move by 0.6. Over 40-70 tokens such flips are certain. vLLM's semantics sit at the same distance from HF
(notes: up to 9.7 on SmolLM2), so this test guards against gross errors; the exact integer checks here and the
tiny fixtures do the fine checking. Bounds: 6 (top-k), KL 0.2, top-1 0.85.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from refllama.formats.checkpoint import quantized_linears
from refllama.quant import Int8Weight
from refllama.quant.int8 import quantize_tokens_hf, w8a8_matmul

from conftest import GOLDEN, ROOT, smollm2_path

TOPK_ATOL = 6.0
KL_MAX = 0.2
TOP1_MIN = 0.85
GREEDY_MARGIN = 1.0  # greedy tokens must agree at least until HF's top-1/top-2 margin drops below this

MANIFEST = json.loads((GOLDEN / "quant_manifest.json").read_text())["smollm2_w8a8"]


def _smollm2():
    return smollm2_path()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    _smollm2()
    sys.path.insert(0, str(ROOT / "tools"))
    import make_quant_golden

    return make_quant_golden.write_refllama(tmp_path_factory.mktemp("smollm2_w8a8"))


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN / "quant_smollm2_w8a8.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def engine(folder):
    import refllama

    return refllama.load(folder)


def test_golden_file_is_the_one_the_manifest_describes():
    path = ROOT / MANIFEST["golden"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == MANIFEST["golden_sha256"]
    assert hashlib.sha256(_smollm2().read_bytes()).hexdigest() == MANIFEST["gguf_sha256"]


def test_checkpoint_is_bit_for_bit_the_librarys(folder):
    sys.path.insert(0, str(ROOT / "tools"))
    import make_quant_golden

    ours = make_quant_golden.tensor_digests(folder)
    expected = MANIFEST["tensor_sha256"]
    assert sorted(ours) == sorted(expected)
    differ = sorted(name for name in ours if ours[name] != expected[name])
    assert not differ, f"{len(differ)} tensors differ from compressed-tensors' checkpoint, e.g. {differ[:3]}"


def test_loads_as_w8a8(engine):
    weights = quantized_linears(engine.model.weights)
    assert len(weights) == 30 * 7 and all(isinstance(w, Int8Weight) for w in weights)
    assert {w.activation.semantics for w in weights} == {"hf"}
    assert weights[0].q.dtype == np.int8 and not weights[0].q.flags.owndata  # memory-mapped codes


def test_layer0_intermediates_from_hf_input(engine, golden):
    weight = engine.model.weights.layers[0].self_attention.q_proj.weight
    x = golden["l0_q_proj_x"]
    codes, scale = quantize_tokens_hf(x)
    np.testing.assert_array_equal(codes, golden["l0_q_proj_codes"])
    np.testing.assert_array_equal(scale, golden["l0_q_proj_scale"])
    y = w8a8_matmul(x, np.asarray(weight.q), weight.scale, "hf")
    np.testing.assert_allclose(y, golden["l0_q_proj_y"], rtol=0, atol=2e-5)


@pytest.mark.parametrize("prompt", ["chat", "code"])
def test_whole_model_logits_within_the_tie_bound(engine, golden, prompt):
    logits = engine.logits(golden[f"{prompt}_ids"]).astype(np.float64)
    top_ids = golden[f"{prompt}_topk_ids"].astype(np.int64)
    assert np.abs(np.take_along_axis(logits, top_ids, -1) - golden[f"{prompt}_topk"]).max() < TOPK_ATOL
    assert (logits.argmax(-1) == top_ids[:, 0]).mean() >= TOP1_MIN
    ref = golden[f"{prompt}_logits"].astype(np.float64)
    ours = logits[golden[f"{prompt}_positions"]]
    log_p = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    log_q = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
    assert (np.exp(log_p) * (log_p - log_q)).sum(-1).max() < KL_MAX


def test_greedy_continuation_follows_hf(engine, golden):
    ref, margin = golden["chat_greedy"].tolist(), golden["chat_greedy_margin"]
    ours = engine.generate_ids(golden["chat_ids"], max_new_tokens=len(ref))
    first = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b), None)
    assert first is None or margin[first] < GREEDY_MARGIN, (ours, ref)


def test_refllama_generate_runs_the_w8a8_folder(folder):
    result = subprocess.run([sys.executable, "-m", "refllama", "generate", str(folder), "--quiet",
                             "-p", "The capital of France is", "--max-new-tokens", "4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
