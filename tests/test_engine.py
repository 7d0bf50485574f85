from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import refllama
from refllama.errors import BackendError, CheckpointError, ConfigError, InputError

from conftest import FIXTURES


@pytest.mark.parametrize("ids,message", [
    ([], "non-empty"),
    ([[1, 2]], "1-d"),
    ([1, 64], "token id 64 at position (1,)"),
    ([-1], "token id -1"),
    ([1.5, 2.0], "integers"),
])
def test_bad_token_ids_raise_input_error(engines, ids, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engines("tinyllama").logits(ids)


def test_unknown_backend_and_unsupported_dtype(tmp_path):
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        refllama.load(FIXTURES / "tinyllama", backend="tpu")
    with pytest.raises(BackendError, match="computes in float32, float64, not bfloat16"):
        refllama.load(FIXTURES / "tinyllama", dtype="bfloat16")
    with pytest.raises(BackendError, match="unknown compute dtype"):
        refllama.load(FIXTURES / "tinyllama", dtype="float7")


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="not a model folder"):
        refllama.load(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="not found"):
        refllama.load(tmp_path)
    folder = tmp_path / "m"
    shutil.copytree(FIXTURES / "tinyllama", folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_key_value_heads") as info:
        refllama.load(folder)
    assert str(folder / "config.json") in str(info.value)


def test_generate_ids_respects_max_new_tokens_and_eos(engines):
    engine = engines("head_dim")
    prompt = [5, 9, 13, 2, 40, 41, 42, 43, 44, 45]
    full = engine.generate_ids(prompt, 16, stop_at_eos=False)
    assert len(full) == 16
    stopped = engine.generate_ids(prompt, 16)
    if any(t in engine.config.eos_token_id for t in full):
        first = next(i for i, t in enumerate(full) if t in engine.config.eos_token_id)
        assert stopped == full[:first + 1]
    else:
        assert stopped == full
    assert engine.generate_ids(prompt, 0) == []
    assert engine.generate_ids(prompt, 3, stop_at_eos=False) == full[:3]
    with pytest.raises(InputError):
        engine.generate_ids(prompt, -1)


def test_greedy_equals_argmax_of_full_forward(engines):
    engine = engines("mha_linear", "float64")
    ids = [7, 3, 11]
    new = engine.generate_ids(ids, 6, stop_at_eos=False)
    seq = ids + new
    logits = engine.logits(seq)
    assert new == [int(t) for t in logits[len(ids) - 1:-1].argmax(-1)]


def test_cache_overflow_is_a_clear_error(engines):
    engine = engines("tinyllama")
    cache = engine.new_cache(1, 4)
    engine.forward(np.array([[1, 2, 3]]), cache)
    with pytest.raises(InputError, match="KV cache full: 3 tokens cached \\+ 2 new exceeds its size of 4"):
        engine.forward(np.array([[4, 5]]), cache)


def test_logits_beyond_max_position_embeddings(engines):
    """Full forwards past max_position_embeddings are allowed (dynamic NTK exists for them)."""
    engine = engines("dynamic")
    n = engine.config.max_position_embeddings + 8
    assert engine.logits(np.arange(n) % 64).shape == (n, 64)


def test_last_only_prefill_equals_the_last_row(engines):
    engine = engines("llama32", "float64")
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    full = engine.forward(ids, engine.new_cache(1, 8))
    last = engine.forward(ids, engine.new_cache(1, 8), last_only=True)
    assert last.shape == (1, 1, 64)
    np.testing.assert_allclose(last[0, 0], full[0, -1], rtol=0, atol=1e-13)
