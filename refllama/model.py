"""The Llama forward pass, written once, against the backend interface.

    embed -> L x [ x += attn(rms_norm(x)); x += mlp(rms_norm(x)) ] -> rms_norm -> lm_head

References: Touvron et al. 2023 (LLaMA: pre-norm RMSNorm, SwiGLU, RoPE), Ainslie et al. 2023 (grouped-query
attention), Su et al. 2021 (RoPE), and transformers' `models/llama/modeling_llama.py`, whose tensor names and
numerics this follows. Shapes: B batch, T new tokens, S cached + new tokens, H query heads, KV key/value heads,
D head_dim. Nothing here knows which backend runs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refllama import rope
from refllama.config import LlamaConfig
from refllama.kv_cache import KVCache
from refllama.weights import AttentionWeights, Linear, MLPWeights, WeightMap

Array = Any


class LlamaModel:
    def __init__(self, config: LlamaConfig, weights: WeightMap, backend: Any):
        """`weights` must already be the backend's arrays (see GenericLlamaEngine)."""
        self.config, self.weights, self.backend = config, weights, backend
        # Tied embeddings: the output projection is the embedding table itself.
        self.lm_head = Linear(weights.lm_head if weights.lm_head is not None else weights.embeddings)

    def forward(self, input_ids: np.ndarray, cache: KVCache, attention_mask: np.ndarray | None = None,
                positions: np.ndarray | None = None, trace: dict[str, Array] | None = None,
                last_only: bool = False) -> Array:
        """Logits (B, T, vocab) for `input_ids` (B, T) following the `cache.length` tokens already cached.

        attention_mask (B, cache.length + T), 1 for real tokens and 0 for padding, hides padded slots;
        positions (B, T) default to cache.length + arange(T); `last_only` computes the logits of the last position
        only (B, 1, vocab), all a prefill needs before decoding; `trace`, if given, receives every intermediate
        by name (embeddings, layers.N.input_norm, .q, .k, .v, .attention_output, .residual_attention,
        .post_attention_norm, .mlp_output, .residual, final_norm, logits).
        """
        def record(name: str, value: Array) -> Array:
            if trace is not None:
                trace[name] = value
            return value

        c, xp = self.config, self.backend
        B, T = input_ids.shape
        start = cache.length
        cache.check_room(T)
        if positions is None:
            positions = np.broadcast_to(start + np.arange(T), (B, T))
        cos, sin = rope.cos_sin(c, positions)  # (B, T, D) each, float64 on the host
        cos, sin = xp.asarray(cos[:, None]), xp.asarray(sin[:, None])  # (B, 1, T, D), compute dtype
        mask = xp.asarray(_attention_mask(start, T, B, attention_mask))  # (B, T, S) bool

        x = record("embeddings", xp.embedding(self.weights.embeddings, xp.asarray(input_ids)))  # (B, T, hidden)
        for i, layer in enumerate(self.weights.layers):
            h = record(f"layers.{i}.input_norm", xp.rms_norm(x, layer.input_layernorm, c.rms_norm_eps))
            attn = self.attention(i, h, layer.self_attention, cos, sin, mask, cache, trace)
            x = record(f"layers.{i}.residual_attention", x + record(f"layers.{i}.attention_output", attn))
            del attn  # nothing holds a sublayer output past its residual add (peak memory)
            h = record(f"layers.{i}.post_attention_norm", xp.rms_norm(x, layer.post_attention_layernorm,
                                                                      c.rms_norm_eps))
            x = record(f"layers.{i}.residual", x + record(f"layers.{i}.mlp_output", self.mlp(h, layer.mlp)))
        cache.advance(T)
        x = record("final_norm", xp.rms_norm(x, self.weights.final_norm, c.rms_norm_eps))
        if last_only:
            x = x[:, -1:]  # (B, 1, hidden)
        return record("logits", xp.linear(x, self.lm_head))  # (B, T or 1, vocab)

    def attention(self, layer: int, x: Array, w: AttentionWeights, cos: Array, sin: Array, mask: Array,
                  cache: KVCache, trace: dict[str, Array] | None = None) -> Array:
        c, xp = self.config, self.backend
        B, T, _ = x.shape
        H, KV, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = xp.linear(x, w.q_proj).reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
        k = xp.linear(x, w.k_proj).reshape(B, T, KV, D).transpose(0, 2, 1, 3)  # (B, KV, T, D)
        v = xp.linear(x, w.v_proj).reshape(B, T, KV, D).transpose(0, 2, 1, 3)  # (B, KV, T, D)
        q, k = xp.apply_rope(q, cos, sin), xp.apply_rope(k, cos, sin)
        if trace is not None:
            trace.update({f"layers.{layer}.q": q, f"layers.{layer}.k": k, f"layers.{layer}.v": v})
        k, v = cache.update(layer, k, v)  # (B, KV, S, D): cached keys and values plus these
        out = xp.attention(q, k, v, mask)  # (B, H, T, D)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, H * D)  # (B, T, H*D)
        return xp.linear(out, w.o_proj)  # (B, T, hidden)

    def mlp(self, x: Array, w: MLPWeights) -> Array:
        xp = self.backend
        gate, up = xp.linear(x, w.gate_proj), xp.linear(x, w.up_proj)  # (B, T, intermediate)
        return xp.linear(xp.gated_activation(gate, up, self.config.hidden_act), w.down_proj)  # (B, T, hidden)


def _attention_mask(start: int, T: int, B: int, padding: np.ndarray | None) -> np.ndarray:
    """(B, T, S) bool: new token t (at slot start + t) sees slots s <= start + t that are not padding."""
    S = start + T
    causal = np.arange(S)[None, :] <= (start + np.arange(T))[:, None]  # (T, S)
    mask = np.broadcast_to(causal, (B, T, S))
    if padding is not None:
        mask = mask & (np.asarray(padding)[:, None, :S] != 0)
    return np.ascontiguousarray(mask)
