"""The golden fixtures catch a wrong constant: an engine with one constant or convention changed fails the
documented logits check (assert_logits_close under `f32`, against transformers' true-float64 logits) on at least
two fixtures, so no single fixture's quirk carries the check. (~2 s)

Each mutation is refllama's own float32 numpy engine with one thing replaced on the instance (eps a tenth, RoPE theta
10000 for another value or 20000 for 10000, the scaling factor doubled, scores / head_dim, post-norm, KV heads tiled
instead of repeated, GPT-J's interleaved RoPE pairs); the goldens are never touched. The clean engine passes the
same check on every fixture, so a failure is the mutation's.
"""

from __future__ import annotations

import types
from dataclasses import replace

import numpy as np
import pytest

import refllama
from refllama.model import rope
from refllama.model.llama import StepInputs
from refllama.testing import assert_logits_close

from conftest import FIXTURE_NAMES, FIXTURES, LENGTHS, golden
from test_oracle_bugs import _patch_step, attention_scale, eps, gqa_mapping, rope_pairing, theta


def rope_scaling_factor(engine):  # the RoPE scaling factor doubled (no change without scaling)
    def step(original, model, shape, start, mask=None, positions=None):
        good = original(shape, start, mask, positions)
        s = model.config.rope_scaling
        if s is None:
            return good
        config = replace(model.config, rope_scaling=replace(s, factor=2 * s.factor))
        cos, sin = rope.cos_sin(config, np.broadcast_to(start + np.arange(shape[1]), shape))
        return StepInputs(model.backend.asarray(cos[:, None]), model.backend.asarray(sin[:, None]), good.mask)
    _patch_step(engine, step)


def norm_placement(engine):  # post-norm (normalise after each residual add, as the original Transformer did)
    def forward_layers(model, x, first, last, cache, step, trace=None):
        xp, e = model.backend, model.config.rms_norm_eps
        for i in range(first, last):
            layer = model.weights.layers[i]
            x = xp.rms_norm(x + model.attention(i, x, layer.self_attention, step, cache), layer.input_layernorm, e)
            x = xp.rms_norm(x + model.mlp(x, layer.mlp), layer.post_attention_layernorm, e)
        return x
    engine.model.forward_layers = types.MethodType(forward_layers, engine.model)


# eps, theta, attention_scale, gqa_mapping and rope_pairing are tests/test_oracle_bugs.py's injected bugs
MUTATIONS = [eps, theta, rope_scaling_factor, attention_scale, norm_placement, gqa_mapping, rope_pairing]


def _fails_documented_check(engine, name: str) -> bool:
    """assert_logits_close(transformers float64, engine, "f32") at any of the golden lengths fails."""
    g = golden(name)
    for n in LENGTHS:
        try:
            assert_logits_close(g[f"logits_{n}_f64"], engine.logits(g[f"ids_{n}"]), "f32")
        except AssertionError:
            return True
    return False


def test_the_clean_engine_passes_every_fixture():
    failing = [n for n in FIXTURE_NAMES if _fails_documented_check(refllama.load(FIXTURES / n, dtype="float32"), n)]
    assert failing == []


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.__name__)
def test_a_wrong_constant_fails_on_at_least_two_fixtures(mutation):
    failing = []
    for name in FIXTURE_NAMES:
        engine = refllama.load(FIXTURES / name, dtype="float32")
        mutation(engine)
        if _fails_documented_check(engine, name):
            failing.append(name)
    assert len(failing) >= 2, f"{mutation.__name__} fails only on {failing}"
