"""Rotary position embedding tables, computed on the host in float64 for every backend.

One place decides the RoPE numerics so backends cannot drift apart: `inv_freq` follows transformers'
`modeling_rope_utils` formula for each scaling type term by term (in float64 rather than HF's float32), and
`cos_sin` builds the rotate-half tables `cat(freqs, freqs)` that `apply_rope` consumes (or, for Llama 4's
RoPE on adjacent pairs, `repeat(freqs, 2)` for `apply_rope_interleaved`).

Dynamic NTK scaling depends on the sequence length. refllama follows HF's rule for one forward call: the
table is computed from `max(positions) + 1`, enlarged when that passes max_position_embeddings. Keys go into the
KV cache already rotated, so during cached decoding past the limit older keys keep the table of the step that
wrote them, exactly as in HF's cached generation; a full forward over the same tokens rotates every key with
the final table, so the two differ past the limit (docs/numerics.md). Unlike HF, no table is remembered
between calls: a call's table depends only on its own positions.
"""

from __future__ import annotations

import math

import numpy as np

from refllama.config import LlamaConfig


def inv_freq(config: LlamaConfig, seq_len: int | None = None) -> np.ndarray:
    """Inverse frequencies, shape (head_dim // 2,), float64; `seq_len` matters only for dynamic scaling."""
    dim = config.head_dim
    base = config.rope_theta
    scaling = config.rope_scaling
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim
    if scaling is not None and scaling.rope_type == "dynamic":
        max_pos = config.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        factor = scaling.factor
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    freqs = 1.0 / (base**exponents)
    if config.rope_freq_factors is not None:  # llama.cpp's baked-in scaling (GGUF rope_freqs)
        freqs = freqs / np.asarray(config.rope_freq_factors, dtype=np.float64)
    if scaling is None or scaling.rope_type == "dynamic":
        return freqs
    if scaling.rope_type == "linear":
        return freqs / scaling.factor
    # llama3: leave high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / freqs
    freqs_llama = np.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * freqs_llama / factor + smooth * freqs_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, freqs_llama)


def cos_sin(config: LlamaConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables for integer positions (B, T) -> two float64 arrays (B, T, head_dim)."""
    positions = np.asarray(positions, dtype=np.int64)
    table = inv_freq(config, seq_len=int(positions.max()) + 1)
    freqs = positions[..., None].astype(np.float64) * table  # (B, T, head_dim/2)
    if config.rope_interleaved:  # pairs (2i, 2i + 1) share frequency i
        emb = np.repeat(freqs, 2, axis=-1)  # (B, T, head_dim)
    else:  # rotate-half: pairs (i, i + head_dim/2)
        emb = np.concatenate([freqs, freqs], axis=-1)  # (B, T, head_dim)
    return np.cos(emb), np.sin(emb)
