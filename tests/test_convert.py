"""GGUF -> Hugging Face folder: refllama and transformers both load the result to the same model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import refllama
from refllama.formats.convert import gguf_to_hf, main

from conftest import FIXTURES, GOLDEN, smollm2_path
from test_gguf import hf_folder_to_gguf


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    gguf = smollm2_path()
    return gguf, gguf_to_hf(gguf, tmp_path_factory.mktemp("smollm2-hf"))


def test_fixture_round_trip_through_gguf(tmp_path):
    gguf = hf_folder_to_gguf(FIXTURES / "bias", tmp_path / "bias.gguf")
    assert main([str(gguf), str(tmp_path / "hf")]) == 0
    original, converted = refllama.load(FIXTURES / "bias"), refllama.load(tmp_path / "hf")
    for a, b in zip(original.model.weights.tensors(), converted.model.weights.tensors(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert converted.tokenizer is None  # the GGUF carried no vocabulary


def test_smollm2_folder_is_the_same_model_for_refllama(smollm2_folder):
    gguf, folder = smollm2_folder
    assert {p.name for p in folder.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors",
                                                  "tokenizer.json", "tokenizer_config.json"}
    from_gguf, from_folder = refllama.load(gguf), refllama.load(folder)
    assert from_folder.config.tie_word_embeddings and from_folder.config.eos_token_id == (2,)
    for a, b in zip(from_gguf.model.weights.tensors(), from_folder.model.weights.tensors(), strict=True):
        np.testing.assert_array_equal(a, b)
    with np.load(GOLDEN / "smollm2.npz") as g:
        ids = g["paragraph_ids"]
    text = json.loads((GOLDEN / "manifest.json").read_text())["smollm2"]["prompts"]["paragraph"]
    assert from_folder.tokenizer.encode(text) == ids.tolist()
    assert from_folder.tokenizer.chat_template == from_gguf.tokenizer.chat_template


def test_transformers_loads_the_folder_to_the_golden_logits(smollm2_folder):
    if not os.environ.get("CI"):
        pytest.importorskip("transformers", reason="needs the [golden] extra")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder = smollm2_folder
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with np.load(GOLDEN / "smollm2.npz") as g:
        ids, positions, expected = g["code_ids"], g["code_positions"], g["code_logits_f32"]
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)[None]).logits[0].numpy()
    # Same weights and code as the GGUF route the golden came from.
    np.testing.assert_allclose(logits[positions], expected, rtol=0, atol=1e-4)
    text = json.loads((GOLDEN / "manifest.json").read_text())["smollm2"]["prompts"]["unicode"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with np.load(GOLDEN / "smollm2.npz") as g:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == g["unicode_ids"].tolist()
