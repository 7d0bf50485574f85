from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import refllama
from refllama.errors import WeightError

from conftest import FIXTURES


def _copy(tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_tensors_are_all_named(tmp_path):
    folder = _copy(tmp_path, "bias")

    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:, :-1].copy()
        t["model.layers.7.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)

    _rewrite(folder, edit)
    with pytest.raises(WeightError) as info:
        refllama.load(folder)
    text = str(info.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in text
    assert "unexpected tensors: model.layers.7.mlp.up_proj.weight" in text
    assert "'model.layers.0.self_attn.q_proj.weight' has shape [64, 63], the config needs [64, 64]" in text


def test_config_and_checkpoint_disagreeing_on_bias(tmp_path):
    folder = _copy(tmp_path, "bias")
    config = json.loads((folder / "config.json").read_text())
    config["mlp_bias"] = False
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightError, match=r"unexpected tensors: .*mlp\.down_proj\.bias"):
        refllama.load(folder)


def test_integer_weights_in_a_float_checkpoint_are_rejected(tmp_path):
    folder = _copy(tmp_path, "gelu")
    _rewrite(folder, lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}))
    with pytest.raises(WeightError, match=r"'model\.norm\.weight' has dtype I32"):
        refllama.load(folder)


def test_tied_embeddings_use_embed_tokens_and_ignore_a_stored_lm_head(tmp_path):
    engine = refllama.load(FIXTURES / "llama32")
    assert engine.model.weights.lm_head is None
    assert engine.model.lm_head.weight is engine.model.weights.embeddings
    folder = _copy(tmp_path, "llama32")
    _rewrite(folder, lambda t: t.update({"lm_head.weight": np.zeros_like(t["model.embed_tokens.weight"])}))
    ids = [3, 1, 4, 1, 5]
    np.testing.assert_array_equal(refllama.load(folder).logits(ids), engine.logits(ids))


def test_untied_model_needs_its_lm_head(tmp_path):
    folder = _copy(tmp_path, "tinyllama")
    _rewrite(folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(WeightError, match=r"missing tensors: lm_head\.weight"):
        refllama.load(folder)


def test_rotary_inv_freq_buffers_from_old_exporters_are_ignored(tmp_path):
    folder = _copy(tmp_path, "gelu")
    _rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    refllama.load(folder)


def test_weights_stay_memory_mapped_in_float32(engines):
    w = engines("gelu").model.weights.layers[0].mlp.up_proj.weight
    assert w.dtype == np.float32 and not w.flags.owndata and not w.flags.writeable
