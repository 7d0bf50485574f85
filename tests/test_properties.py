"""Properties of the forward pass over random valid models (refllama.testing.strategies), not just the eight fixtures.

Each example writes a real checkpoint and loads it, so the loader, the config and the forward pass are all under
test. Models are small enough (an example takes 5-50 ms) for every property to take the profile's full example
count: 25 under "ci" (about 2 s for the file on two cores), 500 under `--hypothesis-profile=thorough`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import refllama
from refllama import GenerationRequest, LlamaConfig
from refllama.formats.safetensors import TensorSource
from refllama.testing import assert_logits_close
from refllama.testing.strategies import (
    Checkpoint,
    llama_checkpoints,
    llama_configs,
    shard_layouts,
    token_ids,
    write_checkpoint,
)

PROFILE = {"float64": "f64", "float32": "f32"}
dtypes = st.sampled_from(["float32", "float64"])


@st.composite
def checkpoints_and_ids(draw: st.DrawFn, configs: st.SearchStrategy[LlamaConfig] | None = None,
                        ) -> tuple[Checkpoint, list[int]]:
    checkpoint = draw(llama_checkpoints(configs))
    return checkpoint, draw(token_ids(checkpoint.config))


@given(checkpoints_and_ids(), dtypes, st.data())
def test_cached_decoding_equals_a_full_forward(case, dtype, data):
    """Any split into a prefill and decode chunks, through a cache larger than needed (within
    max_position_embeddings: past it dynamic NTK differs by design, docs/numerics.md)."""
    checkpoint, ids = case
    engine = refllama.load(checkpoint.path, dtype=dtype)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(ids) - 1)), label="cuts")) if len(ids) > 1 else []
    cache = engine.new_cache(1, len(ids) + 3)
    chunks = [engine.forward(np.array([piece]), cache)[0] for piece in np.split(np.array(ids), cuts)]
    assert cache.length == len(ids)
    assert_logits_close(engine.logits(ids), np.concatenate(chunks), PROFILE[dtype])


def repeat_kv_heads(checkpoint: Checkpoint) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """The same model as multi-head attention: KV head j repeated for each of its query heads, in place."""
    c = checkpoint.config
    mha = dataclasses.replace(c, num_key_value_heads=c.num_attention_heads)
    weights = dict(checkpoint.weights)
    for i in range(c.num_hidden_layers):
        for proj in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                name = f"model.layers.{i}.self_attn.{proj}.{kind}"
                if name in weights:
                    w = weights[name]
                    per_head = w.reshape(c.num_key_value_heads, c.head_dim, *w.shape[1:])
                    weights[name] = np.repeat(per_head, c.num_key_value_groups, axis=0).reshape(-1, *w.shape[1:])
    return mha, weights


@given(checkpoints_and_ids(llama_configs().filter(lambda c: c.num_key_value_groups > 1)))
def test_grouped_query_attention_equals_mha_with_repeated_kv_heads(case):
    checkpoint, ids = case
    mha_config, mha_weights = repeat_kv_heads(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        mha = refllama.load(write_checkpoint(tmp, mha_config, mha_weights), dtype="float64")
        assert mha.config.num_key_value_heads == mha.config.num_attention_heads
        gqa = refllama.load(checkpoint.path, dtype="float64")
        assert_logits_close(gqa.logits(ids), mha.logits(ids), "f64")


@st.composite
def batches(draw: st.DrawFn) -> tuple[Checkpoint, list[GenerationRequest]]:
    checkpoint = draw(llama_checkpoints())
    requests = [GenerationRequest(token_ids=draw(token_ids(checkpoint.config, max_size=12)),
                                  max_new_tokens=draw(st.integers(0, 5)),
                                  temperature=draw(st.sampled_from([0.0, 0.8])), seed=draw(st.integers(0, 99)),
                                  logprobs=2, echo=True)
                for _ in range(draw(st.integers(2, 3)))]
    return checkpoint, requests


@given(batches())
def test_a_batch_row_equals_the_request_alone(case):
    """Left padding, masks and per-row positions: every row generates what it would alone (float64)."""
    checkpoint, requests = case
    engine = refllama.load(checkpoint.path, dtype="float64")
    for request, row in zip(requests, engine.generate(requests), strict=True):
        alone = engine.generate(request)
        assert (row.token_ids, row.finish_reason) == (alone.token_ids, alone.finish_reason)
        np.testing.assert_allclose([t.logprob for t in row.logprobs], [t.logprob for t in alone.logprobs],
                                   rtol=0, atol=1e-10)
        np.testing.assert_allclose([t.logprob for t in row.prompt_logprobs[1:]],
                                   [t.logprob for t in alone.prompt_logprobs[1:]], rtol=0, atol=1e-10)


@given(checkpoints_and_ids())
def test_float32_stays_within_the_f32_profile_of_float64(case):
    """The profile also holds top-1 where the float64 margin exceeds 1e-3; closer ties may flip in float32."""
    checkpoint, ids = case
    reference = refllama.load(checkpoint.path, dtype="float64").logits(ids)
    assert_logits_close(reference, refllama.load(checkpoint.path, dtype="float32").logits(ids), "f32")


@given(checkpoints_and_ids(), dtypes, st.data())
def test_the_shard_layout_changes_nothing(case, dtype, data):
    """Which tensor lands in which shard, the order of the files and of the index: identical logits, bit for bit."""
    checkpoint, ids = case
    layout = data.draw(shard_layouts(list(checkpoint.weights), st.integers(1, 4)), label="layout")
    with tempfile.TemporaryDirectory() as tmp:
        relaid = refllama.load(write_checkpoint(tmp, checkpoint.config, checkpoint.weights, layout), dtype=dtype)
        np.testing.assert_array_equal(relaid.logits(ids), refllama.load(checkpoint.path, dtype=dtype).logits(ids))


@given(checkpoints_and_ids(), dtypes)
def test_a_saved_and_reloaded_checkpoint_gives_identical_logits(case, dtype):
    """Save what refllama read (config and tensors, in their stored dtypes) and load it again: nothing moves."""
    checkpoint, ids = case
    source = TensorSource(checkpoint.path)
    read = {name: np.array(source.get(name)) for name in source.names()}
    config = LlamaConfig.from_dir(checkpoint.path)
    assert config == checkpoint.config
    for name, stored in checkpoint.weights.items():
        assert read[name].dtype == stored.dtype
        np.testing.assert_array_equal(read[name], stored)
    with tempfile.TemporaryDirectory() as tmp:
        saved = write_checkpoint(Path(tmp), config, read)
        assert LlamaConfig.from_dir(saved) == config
        reloaded = refllama.load(saved, dtype=dtype).logits(ids)
        np.testing.assert_array_equal(reloaded, refllama.load(checkpoint.path, dtype=dtype).logits(ids))
