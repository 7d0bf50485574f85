"""The tiny checkpoints made by the real tools (tests/fixtures/quant/, see its README): their files, how they
load, and W8A8's layer-0 intermediates against HF's. Every backend's logits against each folder's golden are the
conformance suite's (refllama/testing/conformance.py, run by tests/test_conformance.py), with the bounds of
refllama/testing/golden.py.

Measured, numpy backend, max |logit diff| over prompts a (7 tokens) and b (19 tokens):

| fixture | reference key | float32 | float64 |
| --- | --- | --- | --- |
| tiny-llama-bf16 | logits_* (HF f32) / logits_*_f64pure | 4.7e-6 | 1.1e-14 |
| tiny-w8a16-g32, tiny-w8a16-ch, tiny-w4a16-g32 | logits_* (HF, exact f32 decompress) | 4.8e-6 | 6.3e-6 |
| tiny-w4a16-g32-asym, tiny-gptq-w4g32(-actorder), tiny-awq-w4g32 | logits_*_f32dequant | 5.3e-6 | 7.0e-6 |
| tiny-w8a8, "vllm" semantics | logits_*_int8vllm | 1.6e-6 | 1.7e-6 |
| tiny-w8a8, "hf" semantics | logits_* (HF fake-quant) | 1.9e-6 (a) / 0.080 (b) | 0.11 / 0.135 |

W8A8 with compressed-tensors' formula is not continuous in its input: a token whose largest-magnitude element is
negative puts it exactly on the -127.5 rounding tie, and which way it rounds depends on the last bit of the scale.
Our float32 forward agrees with HF's to ~1e-6 upstream, which flips one such code at layer 0 (gate/up input, token
13 of prompt b: HF -127, us -128); every later code for that token moves and the logits move by 0.08. In float64
the scale itself is computed in float64, so more ties resolve differently. Hence the whole-model bound 0.3 with
top-1 >= 0.9 (refllama/quant/int8.py), while everything tie-free is held exactly: the layer-0 codes, scales and
int32 accumulators from HF's own input, and the vLLM semantics (whose absmax element maps to +-127, never a tie)
to 2e-5.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import refllama
from refllama.backends import get_backend
from refllama.config import LlamaConfig
from refllama.formats.checkpoint import load_weight_map, quantized_linears
from refllama.formats.safetensors import TensorSource
from refllama.quant import Int8Weight, PackedIntWeight, dequantize
from refllama.quant.int8 import int8_accumulate, quantize_tokens_hf, quantize_tokens_vllm, w8a8_matmul
from refllama.testing import golden

from conftest import GOLDEN, QUANT, QUANT_NAMES, quant_engine, quant_golden

PROMPTS = ("a", "b")


def reference_key(name: str, prompt: str) -> str:
    """The golden key the engine must match tightly: the exact-dequant reference where HF's route was inexact."""
    return golden.reference_key(quant_golden(name), prompt)


@pytest.mark.parametrize("name", QUANT_NAMES)
def test_fixture_files_match_their_manifest(name):
    index = json.loads((GOLDEN / "quant_manifest.json").read_text())["tiny_fixtures"]["folders"]
    assert sorted(index) == QUANT_NAMES
    manifest_bytes = (QUANT / name / "manifest.json").read_bytes()
    assert hashlib.sha256(manifest_bytes).hexdigest() == index[name]["manifest_sha256"]
    manifest = json.loads(manifest_bytes)
    for fname, entry in manifest["files"].items():
        data = (QUANT / name / fname).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"], fname


@pytest.mark.parametrize("name", [n for n in QUANT_NAMES if "dequant_l0_q_proj" in quant_golden(n)])
def test_unpackers_equal_the_golden_dequant_bit_for_bit(name):
    g = quant_golden(name)
    attention = quant_engine(name).model.weights.layers[0].self_attention
    for proj in ("q_proj", "k_proj"):
        weight = getattr(attention, proj).weight
        assert isinstance(weight, Int8Weight | PackedIntWeight)
        np.testing.assert_array_equal(dequantize(weight), g[f"dequant_l0_{proj}"], err_msg=proj)


def test_loaded_types_per_fixture():
    expected = {"tiny-w8a8": (Int8Weight, None, "hf"), "tiny-w8a16-g32": (PackedIntWeight, 8, None),
                "tiny-w8a16-ch": (PackedIntWeight, 8, None), "tiny-w4a16-g32": (PackedIntWeight, 4, None),
                "tiny-w4a16-g32-asym": (PackedIntWeight, 4, None), "tiny-gptq-w4g32": (PackedIntWeight, 4, None),
                "tiny-gptq-w4g32-actorder": (PackedIntWeight, 4, None), "tiny-awq-w4g32": (PackedIntWeight, 4, None)}
    for name, (kind, bits, semantics) in expected.items():
        weights = quantized_linears(quant_engine(name).model.weights)
        assert len(weights) == 14 and all(type(w) is kind for w in weights), name  # lm_head stays float
        if bits is not None:
            assert {w.bits for w in weights} == {bits}, name
        if semantics is not None:
            assert {w.activation.semantics for w in weights} == {semantics}
    actorder = quantized_linears(quant_engine("tiny-gptq-w4g32-actorder").model.weights)[0]
    assert actorder.g_idx is not None and not np.all(np.diff(actorder.g_idx) >= 0)  # not monotonic
    assert quantized_linears(quant_engine("tiny-gptq-w4g32").model.weights)[0].g_idx is None
    asym = quantized_linears(quant_engine("tiny-w4a16-g32-asym").model.weights)[0]
    assert asym.zero is not None and asym.zero.shape == (128, 4)


# --- W8A8 -------------------------------------------------------------------------------------------------------

def test_w8a8_layer0_intermediates_equal_the_golden_exactly():
    g = quant_golden("tiny-w8a8")
    weight = quant_engine("tiny-w8a8").model.weights.layers[0].self_attention.q_proj.weight
    x = g["l0_q_proj_x_a"]  # HF's own input to layer-0 q_proj, (7, 128) float32
    codes, scale = quantize_tokens_hf(x)
    np.testing.assert_array_equal(codes, g["l0_q_proj_ct_codes_a"])
    np.testing.assert_array_equal(scale, g["l0_q_proj_ct_scale_a"])
    assert (codes == -128).any()  # the most negative code occurs (a negative absmax resolved to -128)
    vcodes, vscale = quantize_tokens_vllm(x)
    np.testing.assert_array_equal(vcodes, g["l0_q_proj_vllm_codes_a"])
    np.testing.assert_array_equal(vscale, g["l0_q_proj_vllm_scale_a"])
    acc = int8_accumulate(vcodes, np.asarray(weight.q))
    np.testing.assert_array_equal(acc, g["l0_q_proj_vllm_acc_a"])
    np.testing.assert_array_equal(w8a8_matmul(x, np.asarray(weight.q), weight.scale, "vllm"),
                                  g["l0_q_proj_y_vllm_a"])
    # compressed-tensors semantics in the integer domain vs HF's float fake-quant: float32 rounding only
    y = w8a8_matmul(x, np.asarray(weight.q), weight.scale, "hf")
    np.testing.assert_allclose(y, g["l0_q_proj_y_hf_a"], rtol=0, atol=1e-5)  # measured 1.2e-6, |y| <= 4.4


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_two_w8a8_semantics_differ_on_this_model(dtype):
    """Up to 0.18 here (notes), so the conformance suite's checks of each semantics against its golden can tell
    them apart."""
    g = quant_golden("tiny-w8a8")
    vllm = quant_engine("tiny-w8a8", dtype=dtype, semantics="vllm").logits(g["ids_b"])
    assert np.abs(vllm - g["logits_b_int8vllm"]).max() < 1e-4 < np.abs(vllm - g["logits_b"]).max()


def test_dequantize_option_keeps_w8a8_and_dequantizes_the_rest():
    folder = QUANT / "tiny-w4a16-g32-asym"
    config = LlamaConfig.from_dir(folder)
    weights = load_weight_map(TensorSource(folder), config, dequantize=True)
    assert not quantized_linears(weights)
    g = quant_golden("tiny-w4a16-g32-asym")
    ours = refllama.GenericLlamaEngine(config, weights, get_backend("numpy")).logits(g["ids_b"])
    np.testing.assert_array_equal(ours, quant_engine("tiny-w4a16-g32-asym").logits(g["ids_b"]))
    w8a8 = load_weight_map(TensorSource(QUANT / "tiny-w8a8"), LlamaConfig.from_dir(QUANT / "tiny-w8a8"),
                           dequantize=True)
    assert len(quantized_linears(w8a8)) == 14  # dequantizing would drop the activation quantization


def test_greedy_generation_runs_on_a_w8a8_folder():
    g = quant_golden("tiny-w8a8")
    new = quant_engine("tiny-w8a8").generate_ids(g["ids_a"], max_new_tokens=6, stop_at_eos=False)
    assert len(new) == 6 and new[0] == int(g["logits_a"][-1].argmax())
