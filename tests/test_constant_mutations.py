"""The golden fixtures catch a wrong constant: an engine with one constant or convention changed fails the
documented logits check (assert_logits_close under `f32`, against transformers' true-float64 logits) on at least
two fixtures, so no single fixture's quirk carries the check. (~4 s)

Each mutation is refllama's own float32 numpy engine with one thing replaced on the instance; the goldens are never
touched. The clean engine passes the same check on every fixture, so a failure is the mutation's.
"""

from __future__ import annotations

import types
from dataclasses import replace

import numpy as np
import pytest

import refllama
from refllama.model import ops, rope
from refllama.model.llama import StepInputs
from refllama.testing import assert_logits_close

from conftest import FIXTURE_NAMES, FIXTURES, LENGTHS, golden


class _Patched:
    """A backend with some operations replaced; every other attribute is the real backend's."""

    def __init__(self, inner, **replaced):
        self._inner = inner
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _patch_ops(engine, **replaced) -> None:
    engine.model.backend = _Patched(engine.model.backend, **replaced)


def _patch_rope_config(engine, change) -> None:
    """Build the RoPE tables from `change(config)` instead of the model's config (the full pass only)."""
    original = engine.model.step_inputs

    def step(model, shape, start, mask=None, positions=None):
        good = original(shape, start, mask, positions)
        pos = np.broadcast_to(start + np.arange(shape[1]), shape)
        cos, sin = rope.cos_sin(change(model.config), pos)
        return StepInputs(model.backend.asarray(cos[:, None]), model.backend.asarray(sin[:, None]), good.mask)

    engine.model.step_inputs = types.MethodType(step, engine.model)


def eps(engine):  # RMSNorm eps a tenth of the config's (1e-6 for 1e-5, as a hard-coded default would)
    _patch_ops(engine, rms_norm=lambda x, w, e: ops.rms_norm(x, w, e / 10))


def rope_theta(engine):  # RoPE base 10000 where the config says otherwise (twice it where it is 10000)
    _patch_rope_config(engine, lambda c: replace(c, rope_theta=10000.0 if c.rope_theta != 10000.0 else 20000.0))


def rope_scaling_factor(engine):  # the RoPE scaling factor doubled (no change without scaling)
    def change(c):
        s = c.rope_scaling
        return c if s is None else replace(c, rope_scaling=replace(s, factor=2 * s.factor))
    _patch_rope_config(engine, change)


def attention_scale(engine):  # scores / head_dim instead of / sqrt(head_dim)
    _patch_ops(engine, attention=lambda q, k, v, m: ops.attention(q * q.shape[-1] ** -0.5, k, v, m))


def norm_placement(engine):  # post-norm (normalise after each residual add, as the original Transformer did)
    def forward_layers(model, x, first, last, cache, step, trace=None):
        xp, eps = model.backend, model.config.rms_norm_eps
        for i in range(first, last):
            layer = model.weights.layers[i]
            x = xp.rms_norm(x + model.attention(i, x, layer.self_attention, step, cache), layer.input_layernorm, eps)
            x = xp.rms_norm(x + model.mlp(x, layer.mlp), layer.post_attention_layernorm, eps)
        return x
    engine.model.forward_layers = types.MethodType(forward_layers, engine.model)


def gqa_mapping(engine):  # query head h reads KV head h % KV (tiled) instead of h // (H / KV) (no change for MHA/MQA)
    def attention(q, k, v, mask):
        reps = q.shape[1] // k.shape[1]
        return ops.attention(q, np.tile(k, (1, reps, 1, 1)), np.tile(v, (1, reps, 1, 1)), mask)
    _patch_ops(engine, attention=attention)


def rope_pairing(engine):  # GPT-J's interleaved pairs (x0, x1), (x2, x3), ... instead of rotate-half
    def apply(x, cos, sin):
        half = x.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = even * c - odd * s, even * s + odd * c
        return out
    _patch_ops(engine, apply_rope=apply)


MUTATIONS = [eps, rope_theta, rope_scaling_factor, attention_scale, norm_placement, gqa_mapping, rope_pairing]


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
