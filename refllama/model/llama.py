"""The Llama forward pass, written once, against the backend interface.

    embed -> L x [ x += attn(rms_norm(x)); x += mlp(rms_norm(x)) ] -> rms_norm -> lm_head

The arithmetic of each operation (`xp.rms_norm`, `xp.attention`, ...) is in `ops.py` beside this file, which the
numpy backend runs as it is; other backends run the same operations on their own arrays.

References: Touvron et al. 2023 (LLaMA: pre-norm RMSNorm, SwiGLU, RoPE), Ainslie et al. 2023 (grouped-query
attention), Su et al. 2021 (RoPE), and transformers' `models/llama/modeling_llama.py`, whose tensor names and
numerics this follows. Shapes: B batch, T new tokens, S cached + new tokens, H query heads, KV key/value heads,
D head_dim. Nothing here knows which backend runs it.

`forward` is `embed`, `forward_layers` over every layer and `head`: a pipeline stage runs the same three pieces
over its own span of layers, with the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from refllama.config import LlamaConfig
from refllama.model import rope
from refllama.model.kv_cache import KVCache
from refllama.model.weights import AttentionWeights, Linear, MLPWeights, WeightMap

Array = Any
Trace = dict[str, Array] | None


@dataclass(frozen=True)
class StepInputs:
    """What every layer of one forward call shares: RoPE tables and the attention mask, in the backend's arrays."""

    cos: Array  # (B, 1, T, D)
    sin: Array  # (B, 1, T, D)
    mask: Array  # (B, T, S) bool: query t may attend to slot s


class LlamaModel:
    def __init__(self, config: LlamaConfig, weights: WeightMap, backend: Any):
        """`weights` must already be the backend's arrays (see GenericLlamaEngine)."""
        self.config, self.weights, self.backend = config, weights, backend
        # Tied embeddings: the output projection is the embedding table itself.
        self.lm_head = Linear(weights.lm_head if weights.lm_head is not None else weights.embeddings)

    def forward(self, input_ids: np.ndarray, cache: KVCache, attention_mask: np.ndarray | None = None,
                positions: np.ndarray | None = None, trace: Trace = None, last_only: bool = False) -> Array:
        """Logits (B, T, vocab) for `input_ids` (B, T) following the `cache.length` tokens already cached.

        attention_mask (B, cache.length + T), 1 for real tokens and 0 for padding, hides padded slots;
        positions (B, T) default to cache.length + arange(T); `last_only` computes the logits of the last position
        only (B, 1, vocab), all a prefill needs before decoding; `trace`, if given, receives every intermediate
        by name (embeddings, layers.N.input_norm, .q, .k, .v, .attention_output, .residual_attention,
        .post_attention_norm, .mlp_output, .residual, final_norm, logits).
        """
        step = self.step_inputs(input_ids.shape, cache.length, attention_mask, positions)
        x = self.embed(input_ids, trace)  # (B, T, hidden)
        x = self.forward_layers(x, 0, self.config.num_hidden_layers, cache, step, trace)
        cache.advance(input_ids.shape[1])
        return self.head(x, trace, last_only)  # (B, T or 1, vocab)

    def step_inputs(self, shape: tuple[int, int], start: int, attention_mask: np.ndarray | None = None,
                    positions: np.ndarray | None = None) -> StepInputs:
        """RoPE tables and mask for T new tokens (shape (B, T)) after `start` cached ones."""
        B, T = shape
        if positions is None:
            positions = np.broadcast_to(start + np.arange(T), (B, T))
        cos, sin = rope.cos_sin(self.config, positions)  # (B, T, D) each, float64 on the host
        xp = self.backend
        return StepInputs(xp.asarray(cos[:, None]), xp.asarray(sin[:, None]),  # (B, 1, T, D), compute dtype
                          xp.asarray(attention_mask_for(start, T, B, attention_mask)))  # (B, T, S) bool

    def embed(self, input_ids: np.ndarray, trace: Trace = None) -> Array:
        """Token ids (B, T) -> the residual stream (B, T, hidden)."""
        xp = self.backend
        return _record(trace, "embeddings", xp.embedding(self.weights.embeddings, xp.asarray(input_ids)))

    def forward_layers(self, x: Array, first: int, last: int, cache: KVCache, step: StepInputs,
                       trace: Trace = None) -> Array:
        """Layers [first, last) over the residual stream x (B, T, hidden) -> (B, T, hidden).

        Each layer writes its keys and values into `cache` after its `cache.length` filled slots; the caller
        marks them filled (`cache.advance(T)`) once every layer the cache holds has run.
        """
        c, xp = self.config, self.backend
        cache.check_room(x.shape[1])
        for i in range(first, last):
            layer = self.weights.layers[i]
            h = _record(trace, f"layers.{i}.input_norm", xp.rms_norm(x, layer.input_layernorm, c.rms_norm_eps))
            attn = self.attention(i, h, layer.self_attention, step, cache, trace)
            x = _record(trace, f"layers.{i}.residual_attention",
                        x + _record(trace, f"layers.{i}.attention_output", attn))
            del attn  # nothing holds a sublayer output past its residual add (peak memory)
            h = _record(trace, f"layers.{i}.post_attention_norm",
                        xp.rms_norm(x, layer.post_attention_layernorm, c.rms_norm_eps))
            x = _record(trace, f"layers.{i}.residual",
                        x + _record(trace, f"layers.{i}.mlp_output", self.mlp(h, layer.mlp)))
        return x

    def head(self, x: Array, trace: Trace = None, last_only: bool = False) -> Array:
        """The final norm and the vocabulary projection: (B, T, hidden) -> logits (B, T or 1, vocab)."""
        xp = self.backend
        x = _record(trace, "final_norm", xp.rms_norm(x, self.weights.final_norm, self.config.rms_norm_eps))
        if last_only:
            x = x[:, -1:, :]  # (B, 1, hidden)
        return _record(trace, "logits", xp.linear(x, self.lm_head))

    def attention(self, layer: int, x: Array, w: AttentionWeights, step: StepInputs, cache: KVCache,
                  trace: Trace = None) -> Array:
        c, xp = self.config, self.backend
        H, KV = c.num_attention_heads, c.num_key_value_heads
        q = xp.split_heads(xp.linear(x, w.q_proj), H)  # (B, T, H*D) -> (B, H, T, D)
        k = xp.split_heads(xp.linear(x, w.k_proj), KV)  # (B, T, KV*D) -> (B, KV, T, D)
        v = xp.split_heads(xp.linear(x, w.v_proj), KV)  # (B, T, KV*D) -> (B, KV, T, D)
        q, k = xp.apply_rope(q, step.cos, step.sin), xp.apply_rope(k, step.cos, step.sin)
        if trace is not None:
            trace.update({f"layers.{layer}.q": q, f"layers.{layer}.k": k, f"layers.{layer}.v": v})
        k, v = cache.update(layer, k, v)  # (B, KV, S, D): cached keys and values plus these
        out = xp.attention(q, k, v, step.mask)  # (B, H, T, D)
        return xp.linear(xp.merge_heads(out), w.o_proj)  # (B, T, H*D) -> (B, T, hidden)

    def mlp(self, x: Array, w: MLPWeights) -> Array:
        xp = self.backend
        gate, up = xp.linear(x, w.gate_proj), xp.linear(x, w.up_proj)  # (B, T, intermediate)
        return xp.linear(xp.gated_activation(gate, up, self.config.hidden_act), w.down_proj)  # (B, T, hidden)


def _record(trace: Trace, name: str, value: Array) -> Array:
    if trace is not None:
        trace[name] = value
    return value


def attention_mask_for(start: int, T: int, B: int, padding: np.ndarray | None) -> np.ndarray:
    """(B, T, S) bool: new token t (at slot start + t) sees slots s <= start + t that are not padding."""
    S = start + T
    causal = np.arange(S)[None, :] <= (start + np.arange(T))[:, None]  # (T, S)
    mask = np.broadcast_to(causal, (B, T, S))
    if padding is not None:
        mask = mask & (np.asarray(padding)[:, None, :S] != 0)
    return np.ascontiguousarray(mask)
