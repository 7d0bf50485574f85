"""llama.cpp traces (refllama/testing/engines.py): the mapping of ggml graph nodes to our names and layouts always,
and real llama.cpp runs where llama-cpp-python is installed (CI does not install it). (~2 s with llama.cpp)"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import refllama
from refllama.testing import compare_traces, trace_names
from refllama.testing.engines import LLAMACPP_LAYER_NAMES, from_ggml, llamacpp_name

from conftest import FIXTURES


def test_ggml_node_names_map_to_ours():
    assert llamacpp_name("Qcur-3") == "layers.3.q"
    assert llamacpp_name("attn_out-0") == "layers.0.attention_output"
    assert llamacpp_name("l_out-29") == "layers.29.residual"
    assert llamacpp_name("embd") == llamacpp_name("inp_embd") == "embeddings"
    assert llamacpp_name("result_norm") == "final_norm" and llamacpp_name("result_output") == "logits"
    for other in ("kqv_out-0", "ffn_gate-0", "norm-0", "norm", "cache_k_l0 (view)", "node_21", "Qcur-x", "Qcur"):
        assert llamacpp_name(other) is None, other
    # every per-layer name of the format has its node, so a complete llama.cpp trace leaves nothing missing
    mapped = {f"layers.0.{ours}" for ours in LLAMACPP_LAYER_NAMES.values()}
    assert mapped == {n for n in trace_names(1) if n.startswith("layers.0.")}


def _converter_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's reordering of q/k projection rows, per head: row a * D/2 + j goes to row 2j + a."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("name", ["layers.2.q", "layers.2.k", "layers.2.v"])
def test_heads_come_back_in_our_layout_and_pair_order(name):
    T, H, D, hidden = 5, 3, 8, 12
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((T, hidden)), rng.standard_normal((H * D, hidden))
    ours = (x @ w.T).reshape(T, H, D).transpose(1, 0, 2)  # (H, T, D), Hugging Face row order
    stored = w if name.endswith(".v") else _converter_permute(w, H)  # v rows are stored as they are
    ggml = x @ stored.T  # what llama.cpp holds: ne = (D, H, T, 1), so memory order (T, H, D)
    np.testing.assert_array_equal(from_ggml(name, ggml.ravel(), (D, H, T, 1)), ours)
    assert from_ggml(name, ggml.ravel(), (H * D, T, 1, 1)) is None  # the 2-D node before the reshape into heads


def test_two_dimensional_tensors_are_tokens_by_width():
    values = np.arange(2 * 7, dtype=np.float64)
    np.testing.assert_array_equal(from_ggml("logits", values, (7, 2, 1, 1)), values.reshape(2, 7))


needs_llamacpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or
                                    importlib.util.find_spec("gguf") is None,
                                    reason="llama-cpp-python and gguf are not installed (CI installs neither)")


@needs_llamacpp
@pytest.mark.parametrize("fixture", ["head_dim", "bias"])
def test_llamacpp_in_float32_follows_the_reference_at_every_tensor(tmp_path, fixture):
    """An f32 GGUF with an f32 KV cache and no flash attention is float32 arithmetic throughout: every tensor within
    `f32`. llama.cpp's defaults (f16 KV cache, flash attention) part first at layer 0's attention output."""
    from refllama.testing.engines import llamacpp_trace

    from test_gguf import hf_folder_to_gguf

    path = hf_folder_to_gguf(FIXTURES / fixture, tmp_path / f"{fixture}.gguf", for_llamacpp=True)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    reference = refllama.load(path, dtype="float64").trace(ids)
    trace, manifest = llamacpp_trace(str(path), ids, kv_cache="f32", flash_attention=False)
    assert manifest["missing"] == [] and list(trace) == list(reference)
    rows = compare_traces(reference, trace, "f32")
    assert all(row.ok for row in rows), [row for row in rows if not row.ok]
    default, _ = llamacpp_trace(str(path), ids)
    first = next(row for row in compare_traces(reference, default, "f32") if not row.ok)
    assert first.name == "layers.0.attention_output"
