"""The oracle toolkit against injected bugs: each bug, put into a float32 engine one at a time, must fail the
documented checks (assert_logits_close, or assert_cached_matches_full for a bug of the KV-cache path only), and
compare_traces must name the tensor where it first shows. (~3 s)

Each bug is a small change of one operation, as an independent engine might get it wrong; the engine is
refllama's own numpy engine with that operation replaced on the instance, so nothing else differs.
"""

from __future__ import annotations

import math
import types
from dataclasses import replace

import numpy as np
import pytest

import refllama
from refllama.config import ActivationType
from refllama.model import ops, rope
from refllama.model.llama import StepInputs
from refllama.testing import assert_cached_matches_full, assert_logits_close, compare_traces, golden_fixture_names

from conftest import FIXTURES, golden

DECODE_FROM = 4  # the cached traces: ids[:4] as one prefill, then one token at a time


class _Patched:
    """A backend with some operations replaced; every other attribute is the real backend's."""

    def __init__(self, inner, **replaced):
        self._inner = inner
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _patch_ops(engine, **replaced) -> None:
    engine.model.backend = _Patched(engine.model.backend, **replaced)


def _patch_step(engine, step) -> None:
    """Replace LlamaModel.step_inputs(shape, start, attention_mask, positions) on this engine only."""
    original = engine.model.step_inputs
    engine.model.step_inputs = types.MethodType(lambda self, *a: step(original, self, *a), engine.model)


def eps(engine):  # RMSNorm eps 1e-6 where the config says 1e-5
    _patch_ops(engine, rms_norm=lambda x, w, e: ops.rms_norm(x, w, e / 10))


def theta(engine):  # RoPE base 10000 where the config says otherwise (or twice it where it is 10000)
    def step(original, model, shape, start, mask=None, positions=None):
        good = original(shape, start, mask, positions)
        base = 10000.0 if model.config.rope_theta != 10000.0 else 20000.0
        config = replace(model.config, rope_theta=base)
        pos = np.broadcast_to(start + np.arange(shape[1]), shape)
        cos, sin = rope.cos_sin(config, pos)
        return StepInputs(model.backend.asarray(cos[:, None]), model.backend.asarray(sin[:, None]), good.mask)
    _patch_step(engine, step)


def rope_pairing(engine):  # GPT-J's interleaved pairs (x0, x1), (x2, x3), ... instead of rotate-half
    def apply(x, cos, sin):
        half = x.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = even * c - odd * s, even * s + odd * c
        return out
    _patch_ops(engine, apply_rope=apply)


def attention_scale(engine):  # scores / D instead of / sqrt(D)
    _patch_ops(engine, attention=lambda q, k, v, m: ops.attention(q * q.shape[-1] ** -0.5, k, v, m))


def gqa_mapping(engine):  # query head h reads KV head h % KV (tiled) instead of h // (H / KV) (repeated)
    def attention(q, k, v, mask):
        reps = q.shape[1] // k.shape[1]
        return ops.attention(q, np.tile(k, (1, reps, 1, 1)), np.tile(v, (1, reps, 1, 1)), mask)
    _patch_ops(engine, attention=attention)


def causal_mask(engine):  # each query also sees the next token
    def step(original, model, shape, start, mask=None, positions=None):
        good = original(shape, start, mask, positions)
        leaky = good.mask | np.roll(good.mask, 1, axis=-1)
        return StepInputs(good.cos, good.sin, leaky)
    _patch_step(engine, step)


def activation(engine):  # tanh-approximated GELU where the config says SiLU
    _patch_ops(engine, gated_activation=lambda g, u, act: ops.gated_activation(g, u, ActivationType.GeluTanh))


def norm_offset(engine):  # Gemma's (1 + weight) in RMSNorm, for a Llama checkpoint
    _patch_ops(engine, rms_norm=lambda x, w, e: ops.rms_norm(x, 1 + w, e))


def embedding_scale(engine):  # Gemma's sqrt(hidden) embedding scale, for a Llama checkpoint
    _patch_ops(engine, embedding=lambda t, i: ops.embedding(t, i) * np.float32(math.sqrt(t.shape[1])))


def final_norm_skipped(engine):  # the head projects the residual stream without the final norm
    model = engine.model
    norm = model.backend.rms_norm
    model.backend = _Patched(model.backend, rms_norm=lambda x, w, e: x if w is model.weights.final_norm
                             else norm(x, w, e))


def cached_rope_position(engine):  # cached decoding rotates the new token at position start + 1
    def step(original, model, shape, start, mask=None, positions=None):
        if start > 0 and positions is None:
            positions = np.broadcast_to(start + 1 + np.arange(shape[1]), shape)
        return original(shape, start, mask, positions)
    _patch_step(engine, step)


def cached_mask_stale(engine):  # a decode step does not attend to its own slot
    def step(original, model, shape, start, mask=None, positions=None):
        good = original(shape, start, mask, positions)
        if start == 0:
            return good
        m = np.array(good.mask)
        m[:, :, -1] = False
        return StepInputs(good.cos, good.sin, m)
    _patch_step(engine, step)


# bug -> the first tensor that must diverge; the cache-only bugs leave the full pass intact.
FULL_PASS_BUGS = {
    eps: "layers.0.input_norm",
    theta: "layers.0.q",
    rope_pairing: "layers.0.q",
    attention_scale: "layers.0.attention_output",
    gqa_mapping: "layers.0.attention_output",
    causal_mask: "layers.0.attention_output",
    activation: "layers.0.mlp_output",
    norm_offset: "layers.0.input_norm",
    embedding_scale: "embeddings",
    final_norm_skipped: "final_norm",
}
CACHE_BUGS = {
    cached_rope_position: "layers.0.q",
    cached_mask_stale: "layers.0.attention_output",
}
# The dense golden fixtures: each bug must fail the documented check on at least one, and wherever it fails, the
# trace must name the right tensor (a bug that a fixture cannot show, such as a GQA mapping on an MHA model,
# changes nothing there).
MODELS = golden_fixture_names()


@pytest.fixture(scope="module")
def references():
    return {model: refllama.load(FIXTURES / model, dtype="float64") for model in MODELS}


def _buggy(model, bug):
    engine = refllama.load(FIXTURES / model, dtype="float32")
    bug(engine)
    return engine


def test_the_clean_engine_raises_no_alarm(references):
    for model in MODELS:
        ids = golden(model)["ids_10"].tolist()
        engine, reference = refllama.load(FIXTURES / model, dtype="float32"), references[model]
        assert_logits_close(reference.logits(ids), engine.logits(ids), "f32")
        assert all(r.ok for r in compare_traces(reference.trace(ids), engine.trace(ids), "f32"))
        assert_cached_matches_full(reference.trace(ids), engine.trace(ids, decode_from=DECODE_FROM), DECODE_FROM)


@pytest.mark.parametrize("bug", list(FULL_PASS_BUGS), ids=lambda b: b.__name__)
def test_a_full_pass_bug_is_detected_and_localized(references, bug):
    detected = []
    for model in MODELS:
        ids = golden(model)["ids_10"].tolist()
        engine, reference = _buggy(model, bug), references[model]
        try:
            assert_logits_close(reference.logits(ids), engine.logits(ids), "f32")
        except AssertionError:
            detected.append(model)
            first = next(r for r in compare_traces(reference.trace(ids), engine.trace(ids), "f32") if not r.ok)
            assert first.name == FULL_PASS_BUGS[bug], model
    assert detected, "no fixture detects the bug"


@pytest.mark.parametrize("bug", list(CACHE_BUGS), ids=lambda b: b.__name__)
def test_a_cache_only_bug_is_invisible_to_the_full_pass_and_caught_by_the_cached_check(references, bug):
    for model in MODELS:
        ids = golden(model)["ids_10"].tolist()
        engine, reference = _buggy(model, bug), references[model]
        full = reference.trace(ids)
        assert all(r.ok for r in compare_traces(full, engine.trace(ids), "f32"))  # all the full-pass checks see
        cached = engine.trace(ids, decode_from=DECODE_FROM)
        with pytest.raises(AssertionError, match=rf"first at '{CACHE_BUGS[bug]}'.*position {DECODE_FROM} "
                                                 r"\(decode step 0 through the KV cache\)"):
            assert_cached_matches_full(full, cached, DECODE_FROM, "f32")
        with pytest.raises(AssertionError, match=rf"first at position {DECODE_FROM} \(decode step 0"):
            assert_cached_matches_full(full["logits"], cached["logits"], DECODE_FROM, "f32")
