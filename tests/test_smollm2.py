"""SmolLM2-135M-Instruct (Q4_1 GGUF, the embedded default) against transformers on the same file.

HF loads the GGUF with gguf_file= and dequantizes to float32, as refllama does, so both run the same weights.
Measured (max |logit diff|, four prompts of 42-99 tokens): float32 vs HF float32 <= 6.5e-5, float64 vs HF
patched to true float64 <= 9.1e-14; argmax identical at every position; 32-token greedy continuations identical.
Bounds held here: 2e-4 and 1e-11.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from conftest import GOLDEN, assert_smollm2_logits, load_npz, smollm2_engine, smollm2_path

F64_ATOL = 1e-11  # float64 vs HF patched to true float64 (float32: conftest.SMOLLM2_ATOL, 2e-4)
PROMPTS = ["chat", "paragraph", "code", "unicode"]


@pytest.fixture(scope="module")
def golden():
    return load_npz(GOLDEN / "smollm2.npz")


@pytest.fixture(scope="module")
def engine32():
    return smollm2_engine("float32")


@pytest.fixture(scope="module")
def engine64():
    return smollm2_engine("float64")


def test_golden_was_made_from_this_file():
    manifest = json.loads((GOLDEN / "manifest.json").read_text())["smollm2"]
    digest = hashlib.sha256(smollm2_path().read_bytes()).hexdigest()
    assert digest == manifest["gguf_sha256"]


def test_config_from_gguf(engine32):
    c = engine32.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        49152, 576, 30, 9, 3)
    assert c.tie_word_embeddings and c.head_dim == 64 and c.rope_theta == 100000.0
    assert c.quantization_config.format == "Q4_1"
    assert c.eos_token_id == (2,)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_float32_logits_match_hf(engine32, golden, prompt):
    assert_smollm2_logits(engine32.logits(golden[f"{prompt}_ids"]), golden, prompt)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_float64_logits_match_true_float64_hf(engine64, golden, prompt):
    logits = engine64.logits(golden[f"{prompt}_ids"])
    np.testing.assert_allclose(logits[golden[f"{prompt}_positions_f64"]], golden[f"{prompt}_logits_f64"],
                               rtol=0, atol=F64_ATOL)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches_hf(engine32, golden, prompt):
    assert engine32.generate_ids(golden[f"{prompt}_ids"], 32) == golden[f"{prompt}_greedy_f32"].tolist()


@pytest.mark.parametrize("prompt", ["paragraph", "code", "unicode"])
def test_tokenizer_gives_hf_ids(engine32, golden, prompt):
    """HF's ids (with the smollm digit split restored in tools/) for the prompt texts in the manifest."""
    text = json.loads((GOLDEN / "manifest.json").read_text())["smollm2"]["prompts"][prompt]
    assert engine32.tokenizer.encode(text) == golden[f"{prompt}_ids"].tolist()


def test_chat_prompt_ids_round_trip(engine32, golden):
    ids = golden["chat_ids"].tolist()
    text = engine32.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert engine32.tokenizer.encode(text, add_special_tokens=False) == ids


def test_generate_with_the_default_model():
    import refllama

    smollm2_path()
    response = refllama.generate("The capital of France is", max_new_tokens=8)
    assert str(response) == response.text == " Paris.\n\nThe answer is:"
    chat = refllama.generate([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=16)
    assert "Paris" in chat.text and chat.finish_reason == "eos"
