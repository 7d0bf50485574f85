"""A static KV cache: buffers preallocated per layer, written by position.

Layout per layer: keys and values (B, num_kv_heads, max_len, head_dim), compute dtype. Slot s of a row holds
the token at sequence index s; `length` slots are filled. Keys are stored after RoPE. A cache may hold a span of
layers only, [first_layer, first_layer + num_layers): what one pipeline stage owns.
"""

from __future__ import annotations

from typing import Any

from refllama.errors import InputError

Array = Any


class KVCache:
    def __init__(self, backend: Any, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 first_layer: int = 0):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.backend, self.first_layer = backend, first_layer
        self.keys: list[Array] = [backend.zeros(shape) for _ in range(num_layers)]
        self.values: list[Array] = [backend.zeros(shape) for _ in range(num_layers)]
        self.batch, self.max_len = batch, max_len
        self.length = 0  # filled slots, the same for every layer between forward calls

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_len:
            raise InputError(f"KV cache full: {self.length} tokens cached + {new_tokens} new exceeds its "
                             f"size of {self.max_len}; create a larger cache")

    def update(self, layer: int, k: Array, v: Array) -> tuple[Array, Array]:
        """Write k, v (B, KV, T, D) after the filled slots; return this layer's keys and values so far."""
        end, i = self.length + k.shape[2], layer - self.first_layer
        self.keys[i] = self.backend.cache_write(self.keys[i], k, self.length)
        self.values[i] = self.backend.cache_write(self.values[i], v, self.length)
        return self.keys[i][:, :, :end, :], self.values[i][:, :, :end, :]

    def advance(self, new_tokens: int) -> None:
        """Mark `new_tokens` more slots filled, once every layer has written them."""
        self.length += new_tokens
