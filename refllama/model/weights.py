"""The weights the forward pass reads, as the spec's WeightMap: plain dataclasses under HF's names.

A Linear's weight is a float array or a quantized weight object (refllama.quant) that means the same matrix; the
backend's `linear` runs either. Backends take the weights in with `WeightMap.map` (one function per tensor).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

Array = Any  # a backend array: numpy.ndarray, cupy.ndarray, mlx.core.array


@dataclass
class Linear:
    """y = x @ weight.T + bias, with weight [out_features, in_features] as HF stores it: a float array, or a
    quantized weight object (refllama.quant.Int8Weight / PackedIntWeight) that means the same matrix."""

    weight: Array
    bias: Array | None = None


@dataclass
class AttentionWeights:
    q_proj: Linear  # [num_heads * head_dim, hidden]
    k_proj: Linear  # [num_kv_heads * head_dim, hidden]
    v_proj: Linear  # [num_kv_heads * head_dim, hidden]
    o_proj: Linear  # [hidden, num_heads * head_dim]


@dataclass
class MLPWeights:
    gate_proj: Linear  # [intermediate, hidden]
    up_proj: Linear  # [intermediate, hidden]
    down_proj: Linear  # [hidden, intermediate]


@dataclass
class MoEWeights:
    """A sparse mixture-of-experts MLP: a router and one gated MLP per expert, each expert's three Linears in HF's
    [out, in] orientation whatever the stored layout (per-expert tensors, or stacked [E, ...] slices)."""

    router: Linear  # [num_experts, hidden]
    experts: list[MLPWeights]  # num_experts x ([I, hidden], [I, hidden], [hidden, I])
    shared_expert: MLPWeights | None = None  # Llama 4: added to the routed sum


@dataclass
class LayerWeights:
    self_attention: AttentionWeights
    mlp: MLPWeights | MoEWeights
    input_layernorm: Array  # [hidden]
    post_attention_layernorm: Array  # [hidden]


@dataclass
class WeightMap:
    """Every tensor of a model; a pipeline stage's map holds only its StageSpan (the rest are None)."""

    embeddings: Array  # [vocab, hidden]  (model.embed_tokens.weight)
    layers: list[LayerWeights | None]
    final_norm: Array  # [hidden]          (model.norm.weight)
    lm_head: Array | None  # [vocab, hidden], None when tied to the embeddings

    def map(self, fn: Callable[[Array], Array]) -> WeightMap:
        """A new WeightMap with `fn` applied to every tensor (how a backend takes the weights in)."""
        return map_arrays(self, fn)

    def tensors(self) -> list[Array]:
        """Every tensor, in a fixed order (the order `map` visits them)."""
        out: list[Array] = []

        def collect(array: Array) -> Array:
            out.append(array)
            return array

        self.map(collect)
        return out


@dataclass(frozen=True)
class StageSpan:
    """The part of a model one pipeline stage holds: layers [first, last), the embedding table on the first stage,
    the final norm and the head on the last (with tied embeddings the head is the embedding table: both ends hold
    it)."""

    first: int
    last: int
    embeds: bool  # the first stage: token ids in
    head: bool  # the last stage: logits out

    def holds(self, name: str, tied: bool) -> bool:
        """Whether a checkpoint tensor, by HF name (quantization parts included), belongs to this stage."""
        if name.startswith("model.layers."):
            layer = name.split(".")[2]
            return layer.isdigit() and self.first <= int(layer) < self.last
        if name.startswith("model.embed_tokens."):
            return self.embeds or (self.head and tied)
        return self.head  # model.norm, lm_head

    @property
    def layers(self) -> range:
        return range(self.first, self.last)

    def describe(self) -> str:
        return f"layers {self.first}-{self.last - 1}" if self.last - self.first > 1 else f"layer {self.first}"


# Plain values inside weight objects (bit widths, group sizes, semantics names) are not tensors: `map` keeps them.
_SCALARS = (int, float, str, bool, tuple, enum.Enum)


def map_arrays(node: Any, fn: Callable[[Array], Array]) -> Any:
    """`node` (a WeightMap, a Linear, a quantized weight, a list of them, an array) with `fn` applied to every
    tensor inside it: how the engine hands weights to a backend (`fn` = its `asarray`)."""
    if node is None or isinstance(node, _SCALARS):
        return node
    if isinstance(node, list):
        return [map_arrays(item, fn) for item in node]
    if is_dataclass(node):
        return replace(node, **{f.name: map_arrays(getattr(node, f.name), fn) for f in fields(node)})
    return fn(node)
