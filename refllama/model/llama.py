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

Mixture-of-experts models (Mixtral, Llama 4 text; transformers' `modeling_mixtral.py` and `modeling_llama4.py`)
run the same layers: a layer whose weights hold `MoEWeights` routes each token to its top-k experts (`moe.py`)
and runs only those. Llama 4's attention variants (RoPE on adjacent pairs, layers without RoPE, chunked
attention, weightless QK norm, attention temperature) are switched on by the config, per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from refllama.config import LlamaConfig, Router
from refllama.model import moe, rope
from refllama.model.kv_cache import KVCache
from refllama.model.weights import AttentionWeights, Linear, MLPWeights, MoEWeights, WeightMap

Array = Any
Trace = dict[str, Array] | None


@dataclass(frozen=True)
class StepInputs:
    """What every layer of one forward call shares: RoPE tables and the attention mask, in the backend's arrays."""

    cos: Array  # (B, 1, T, D)
    sin: Array  # (B, 1, T, D)
    mask: Array  # (B, T, S) bool: query t may attend to slot s
    local_mask: Array | None = None  # (B, T, S) the same within the sliding window or chunk, where one is set
    q_scale: Array | None = None  # (1, T, 1) attention temperature of layers without RoPE, where set


class LlamaModel:
    def __init__(self, config: LlamaConfig, weights: WeightMap, backend: Any):
        """`weights` must already be the backend's arrays (see GenericLlamaEngine)."""
        self.config, self.weights, self.backend = config, weights, backend
        # Tied embeddings: the output projection is the embedding table itself.
        self.lm_head = Linear(weights.lm_head if weights.lm_head is not None else weights.embeddings)
        self.qk_norm_weight = backend.asarray(np.ones(config.head_dim)) if config.qk_norm else None

    def forward(self, input_ids: np.ndarray, cache: KVCache, attention_mask: np.ndarray | None = None,
                positions: np.ndarray | None = None, trace: Trace = None, last_only: bool = False) -> Array:
        """Logits (B, T, vocab) for `input_ids` (B, T) following the `cache.length` tokens already cached.

        attention_mask (B, cache.length + T), 1 for real tokens and 0 for padding, hides padded slots;
        positions (B, T) default to cache.length + arange(T); `last_only` computes the logits of the last position
        only (B, 1, vocab), all a prefill needs before decoding; `trace`, if given, receives every intermediate
        by name (embeddings, layers.N.input_norm, .q, .k, .v, .attention_output, .residual_attention,
        .post_attention_norm, .mlp_output, .residual, final_norm, logits; MoE layers also .router_logits, .experts,
        .expert_weights).
        """
        step = self.step_inputs(input_ids.shape, cache.length, attention_mask, positions)
        # embed (B, T, hidden) -> every layer (B, T, hidden) -> head (B, T or 1, vocab), nested so that no name here
        # holds the residual stream while the next piece runs (peak memory)
        logits = self.head(self.forward_layers(self.embed(input_ids, trace), 0, self.config.num_hidden_layers, cache,
                                               step, trace), trace, last_only)
        cache.advance(input_ids.shape[1])
        return logits

    def step_inputs(self, shape: tuple[int, int], start: int, attention_mask: np.ndarray | None = None,
                    positions: np.ndarray | None = None) -> StepInputs:
        """RoPE tables and mask for T new tokens (shape (B, T)) after `start` cached ones."""
        B, T = shape
        if positions is None:
            positions = np.broadcast_to(start + np.arange(T), (B, T))
        c, xp = self.config, self.backend
        cos, sin = rope.cos_sin(c, positions)  # (B, T, D) each, float64 on the host
        mask = attention_mask_for(start, T, B, attention_mask)  # (B, T, S) bool
        local = None
        if c.sliding_window is not None or c.chunked_layers:
            chunk = c.attention_chunk_size if c.chunked_layers else None
            local = xp.asarray(local_mask_for(mask, start, attention_mask, c.sliding_window, chunk))
        q_scale = None
        if c.attn_temperature is not None and c.nope_layers:
            q_scale = xp.asarray(temperature(start + np.arange(T), *c.attn_temperature)[None, :, None])
        return StepInputs(xp.asarray(cos[:, None]), xp.asarray(sin[:, None]),  # (B, 1, T, D), compute dtype
                          xp.asarray(mask), local, q_scale)

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
            mlp = self.moe(i, h, layer.mlp, trace) if isinstance(layer.mlp, MoEWeights) else self.mlp(h, layer.mlp)
            x = _record(trace, f"layers.{i}.residual", x + _record(trace, f"layers.{i}.mlp_output", mlp))
            del mlp  # as attn above
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
        q, k, v = xp.linears(x, (w.q_proj, w.k_proj, w.v_proj))  # (B, T, H*D), (B, T, KV*D), (B, T, KV*D)
        uses_rope = c.uses_rope(layer)
        if not uses_rope and step.q_scale is not None:  # Llama 4's attention temperature on layers without RoPE
            q = q * step.q_scale  # (1, T, 1): one factor per position
        q = xp.split_heads(q, H)  # (B, T, H*D) -> (B, H, T, D)
        k, v = xp.split_heads(k, KV), xp.split_heads(v, KV)  # (B, T, KV*D) -> (B, KV, T, D)
        if uses_rope:
            rotate = xp.apply_rope_interleaved if c.rope_interleaved else xp.apply_rope
            q, k = rotate(q, step.cos, step.sin), rotate(k, step.cos, step.sin)
            if c.qk_norm:  # Llama 4: weightless RMSNorm over head_dim after RoPE
                ones = self.qk_norm_weight
                q, k = xp.rms_norm(q, ones, c.rms_norm_eps), xp.rms_norm(k, ones, c.rms_norm_eps)
        if trace is not None:
            trace.update({f"layers.{layer}.q": q, f"layers.{layer}.k": k, f"layers.{layer}.v": v})
        k, v = cache.update(layer, k, v)  # (B, KV, S, D): cached keys and values plus these
        local = c.sliding_window is not None or layer in c.chunked_layers
        out = xp.attention(q, k, v, step.local_mask if local else step.mask)  # (B, H, T, D)
        return xp.linear(xp.merge_heads(out), w.o_proj)  # (B, T, H*D) -> (B, T, hidden)

    def mlp(self, x: Array, w: MLPWeights) -> Array:
        xp = self.backend
        gate, up = xp.linears(x, (w.gate_proj, w.up_proj))  # (B, T, intermediate) each
        return xp.linear(xp.gated_activation(gate, up, self.config.hidden_act), w.down_proj)  # (B, T, hidden)

    def moe(self, layer: int, x: Array, w: MoEWeights, trace: Trace = None) -> Array:
        """The sparse MLP: each token runs through its top-k experts only; their outputs are summed in ascending
        expert index (as transformers' `index_add_` loop does), then Llama 4's shared expert is added."""
        c, xp = self.config, self.backend
        B, T, hidden = x.shape
        h = x.reshape(B * T, hidden)  # (N, hidden)
        logits = xp.linear(h, w.router)  # (N, E), compute dtype
        routing = moe.route(xp.to_numpy(logits), c.moe)  # on the host: experts, weights (N, k)
        if trace is not None:
            k = c.moe.top_k
            trace[f"layers.{layer}.router_logits"] = logits.reshape(B, T, c.moe.num_experts)
            trace[f"layers.{layer}.experts"] = xp.asarray(routing.experts.reshape(B, T, k))
            trace[f"layers.{layer}.expert_weights"] = xp.asarray(routing.weights.reshape(B, T, k))
        routed = xp.zeros((B * T, hidden))  # (N, hidden)
        for e in routing.active_experts():
            rows, slots = routing.tokens(e)
            scale = xp.asarray(routing.weights[rows, slots][:, None])  # (n, 1)
            index = xp.asarray(rows)
            if c.moe.router is Router.Sigmoid:  # Llama 4 scales the expert's input
                y = self.mlp(h[index] * scale, w.experts[e])  # (n, hidden)
            else:  # Mixtral scales its output
                y = self.mlp(h[index], w.experts[e]) * scale
            routed[index] += y  # each row chose expert e once: a plain indexed add
        if w.shared_expert is not None:
            routed = self.mlp(h, w.shared_expert) + routed
        return routed.reshape(B, T, hidden)


def _record(trace: Trace, name: str, value: Array) -> Array:
    if trace is not None:
        trace[name] = value
    return value


def local_mask_for(mask: np.ndarray, start: int, padding: np.ndarray | None, window: int | None,
                   chunk: int | None) -> np.ndarray:
    """`mask` (B, T, S) narrowed to a sliding window (slot s within `window` slots of the query, itself included)
    or to the query's chunk, counted from each row's first real token as transformers does."""
    B, T, S = mask.shape
    query = (start + np.arange(T))[None, :, None]  # (1, T, 1) slot of each new token
    slot = np.arange(S)[None, None, :]  # (1, 1, S)
    local = mask
    if window is not None:
        local = local & (query - slot < window)
    if chunk is not None:
        pad = np.zeros(B, dtype=np.int64) if padding is None else \
            (np.cumsum(np.asarray(padding)[:, :S] != 0, axis=-1) == 0).sum(axis=-1)  # (B,) leading padding
        pad = pad[:, None, None]
        local = local & ((slot - pad) // chunk == (query - pad) // chunk)
    return np.ascontiguousarray(local)


def temperature(slots: np.ndarray, floor_scale: float, attn_scale: float) -> np.ndarray:
    """Llama 4's query scale for layers without RoPE at sequence slots (T,): log1p(floor((s + 1) / floor_scale))
    * attn_scale + 1, which is 1 below floor_scale positions."""
    return np.log1p(np.floor((slots + 1.0) / floor_scale)) * attn_scale + 1.0


def attention_mask_for(start: int, T: int, B: int, padding: np.ndarray | None) -> np.ndarray:
    """(B, T, S) bool: new token t (at slot start + t) sees slots s <= start + t that are not padding."""
    S = start + T
    causal = np.arange(S)[None, :] <= (start + np.arange(T))[:, None]  # (T, S)
    mask = np.broadcast_to(causal, (B, T, S))
    if padding is not None:
        mask = mask & (np.asarray(padding)[:, None, :S] != 0)
    return np.ascontiguousarray(mask)
