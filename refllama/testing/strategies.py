"""Hypothesis strategies for random valid Llama models: configs, checkpoints on disk, token ids.

Engines tested against refllama need models that exercise every branch of the architecture, not the one or two
checkpoints someone happened to download. These strategies draw small models (forward passes take milliseconds)
across the fields that change the computation: GQA ratios from MHA to MQA, head_dim independent of
hidden_size / heads, the four RoPE types with valid factors, attention and MLP biases, tied embeddings, every
activation, eps, and the stored dtype. Checkpoints are real Hugging Face folders, so a candidate engine loads
them through its own loader.

    from hypothesis import given
    from refllama.testing.strategies import llama_checkpoints, llama_configs

    @given(llama_checkpoints(llama_configs(num_key_value_heads=1)))   # MQA only
    def test_my_engine(checkpoint): ...

Weights come from a NumPy generator seeded by a drawn integer, so a failing example replays and shrinks.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.control import cleanup
from safetensors.numpy import save_file

from refllama.config import ActivationType, LlamaConfig, RopeScaling
from refllama.dtypes import DataType
from refllama.formats.checkpoint import expected_shapes

STORED_DTYPES = (DataType.F32, DataType.F16, DataType.BF16)
_FIELDS = {f.name for f in dataclasses.fields(LlamaConfig)}
INDEX = "model.safetensors.index.json"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def rope_scalings(max_position_embeddings: int, head_dim: int) -> st.SearchStrategy[RopeScaling | None]:
    """None (plain RoPE) or linear, dynamic NTK or llama3 scaling with factors transformers accepts.

    Dynamic NTK raises the base to dim / (dim - 2), which head_dim 2 cannot take (in HF as here)."""
    linear = st.builds(RopeScaling, st.just("linear"), st.floats(1.0, 8.0))
    dynamic = st.builds(RopeScaling, st.just("dynamic"), st.floats(1.0, 4.0))

    @st.composite
    def llama3(draw: st.DrawFn) -> RopeScaling:
        low = draw(st.floats(0.5, 2.0))
        return RopeScaling("llama3", draw(st.floats(1.0, 32.0)), low, low * draw(st.floats(1.5, 8.0)),
                           draw(st.integers(4, max_position_embeddings)))

    scaled = [linear, llama3()] + ([dynamic] if head_dim > 2 else [])
    return st.none() | st.one_of(scaled)


@st.composite
def llama_configs(draw: st.DrawFn, **overrides: Any) -> LlamaConfig:
    """Valid small LlamaConfigs. Keyword arguments fix a LlamaConfig field to a value, or draw it from a strategy
    (`llama_configs(num_key_value_heads=1, hidden_act=st.sampled_from([ActivationType.Relu]))`); fields that
    depend on it (attention heads on KV heads, RoPE scaling on head_dim) follow. The result is validated by
    round-tripping through config.json's form, so it is what `LlamaConfig.from_dir` reads back."""
    unknown = set(overrides) - _FIELDS
    if unknown:
        raise TypeError(f"llama_configs: no LlamaConfig field {', '.join(sorted(unknown))}")

    def pick(name: str, default: Callable[[], st.SearchStrategy[Any]]) -> Any:
        value = overrides[name] if name in overrides else default()
        return draw(value) if isinstance(value, st.SearchStrategy) else value

    if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
        heads = pick("num_attention_heads", lambda: st.integers(1, 12))
        kv_heads = draw(st.sampled_from(_divisors(heads)))
    else:
        kv_heads = pick("num_key_value_heads", lambda: st.integers(1, 3))
        heads = pick("num_attention_heads", lambda: st.integers(1, 4).map(lambda groups: groups * kv_heads))
    head_dim = pick("head_dim", lambda: st.integers(1, 8).map(lambda half: 2 * half))
    max_pos = pick("max_position_embeddings", lambda: st.integers(16, 96))
    vocab = pick("vocab_size", lambda: st.integers(16, 80))
    config = LlamaConfig(
        vocab_size=vocab,
        # hidden_size = heads * head_dim is the implicit-head_dim case; anything else needs config.json's head_dim
        hidden_size=pick("hidden_size", lambda: st.just(heads * head_dim) | st.integers(4, 64)),
        intermediate_size=pick("intermediate_size", lambda: st.integers(4, 96)),
        num_hidden_layers=pick("num_hidden_layers", lambda: st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        hidden_act=pick("hidden_act", lambda: st.sampled_from(list(ActivationType))),
        rms_norm_eps=pick("rms_norm_eps", lambda: st.sampled_from([1e-6, 1e-5]) | st.floats(1e-8, 1e-2)),
        attention_bias=pick("attention_bias", st.booleans),
        mlp_bias=pick("mlp_bias", st.booleans),
        tie_word_embeddings=pick("tie_word_embeddings", st.booleans),
        rope_theta=pick("rope_theta", lambda: st.sampled_from([10000.0, 500000.0]) | st.floats(100.0, 1e6)),
        rope_scaling=pick("rope_scaling", lambda: rope_scalings(max_pos, head_dim)),
        bos_token_id=pick("bos_token_id", lambda: st.none() | st.integers(0, vocab - 1)),
        eos_token_id=pick("eos_token_id", lambda: st.lists(st.integers(0, vocab - 1), min_size=1, max_size=3,
                                                           unique=True).map(tuple)),
        pad_token_id=pick("pad_token_id", lambda: st.none() | st.integers(0, vocab - 1)),
        default_dtype=pick("default_dtype", lambda: st.sampled_from(STORED_DTYPES)),
    )
    return LlamaConfig.from_dict(config.to_hf_dict())


def random_weights(config: LlamaConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float64 weights for every tensor the config needs (HF names), scaled as tools/make_fixtures.py scales
    them so activations stay O(1) and logits O(1)-O(10): clear argmax margins, no overflow in float16."""
    weights = {}
    for name, shape in expected_shapes(config).items():
        if name == "model.embed_tokens.weight":
            # A tied table is also the output projection: scaled like one, or each token's own embedding would
            # dominate the residual stream.
            scale = 1 / np.sqrt(config.hidden_size) if config.tie_word_embeddings else 1.0
            weights[name] = scale * rng.standard_normal(shape)
        elif name.endswith("norm.weight"):
            weights[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            weights[name] = 0.1 * rng.standard_normal(shape)
        else:
            weights[name] = rng.standard_normal(shape) / np.sqrt(shape[1])
    return weights


def write_checkpoint(folder: str | Path, config: LlamaConfig, weights: dict[str, np.ndarray],
                     shards: Sequence[Sequence[str]] | None = None) -> Path:
    """Write config.json and the weights as stored (their own dtypes) into `folder`: one model.safetensors, or
    one file per entry of `shards` (tensor names, in that order) plus model.safetensors.index.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    metadata = {"format": "pt"}
    if shards is None or len(shards) == 1:
        save_file(weights, str(folder / "model.safetensors"), metadata=metadata)
        return folder
    weight_map = {}
    for i, names in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: weights[n] for n in names}, str(folder / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(names, filename))
    total = sum(a.nbytes for a in weights.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}) + "\n")
    return folder


@st.composite
def shard_layouts(draw: st.DrawFn, names: Sequence[str],
                  shards: int | st.SearchStrategy[int] | None = None) -> tuple[tuple[str, ...], ...]:
    """A split of `names` into non-empty shards, in a drawn order: which tensor lands in which file, and the
    order of files and of tensors within them, all vary (shrinking towards one file in sorted order)."""
    count = draw(shards) if isinstance(shards, st.SearchStrategy) else shards or draw(st.integers(1, 3))
    count = max(1, min(count, len(names)))
    order = draw(st.permutations(sorted(names)))
    cuts = sorted(draw(st.lists(st.integers(1, len(names) - 1), min_size=count - 1, max_size=count - 1,
                                unique=True))) if count > 1 else []
    return tuple(tuple(order[a:b]) for a, b in zip([0, *cuts], [*cuts, len(names)], strict=True))


@dataclass(frozen=True)
class Checkpoint:
    """A model written to disk: `path` loads with refllama.load (or transformers); `weights` are the tensors as
    stored, by HF name; `shards` the tensor names of each file (one entry: a single model.safetensors)."""

    path: Path
    config: LlamaConfig
    weights: dict[str, np.ndarray]
    shards: tuple[tuple[str, ...], ...]


@st.composite
def llama_checkpoints(draw: st.DrawFn, configs: st.SearchStrategy[LlamaConfig] | None = None,
                      shards: int | st.SearchStrategy[int] | None = None) -> Checkpoint:
    """A config (from `configs`, default llama_configs()) and random weights in its stored dtype
    (config.default_dtype), written as a Hugging Face folder in a temporary directory, split over `shards` files
    (default 1-3) in a drawn layout. The directory is deleted when the test example finishes, so use it inside
    the test (engines memory-map their weights, which outlive the deletion on POSIX systems)."""
    config = draw(configs if configs is not None else llama_configs())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    stored = config.default_dtype.numpy_dtype
    weights = {name: w.astype(stored) for name, w in random_weights(config, rng).items()}
    layout = draw(shard_layouts(list(weights), shards))
    folder = Path(tempfile.mkdtemp(prefix="refllama-checkpoint-"))
    cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
    write_checkpoint(folder, config, weights, layout)
    return Checkpoint(folder, config, weights, layout)


def token_ids(config: LlamaConfig, min_size: int = 1, max_size: int | None = None) -> st.SearchStrategy[list[int]]:
    """Token id sequences for `config`: ids in [0, vocab_size), at most max_position_embeddings long (default at
    most 32, which keeps forward passes fast)."""
    limit = config.max_position_embeddings
    max_size = min(32, limit) if max_size is None else max_size
    if not 0 < min_size <= max_size <= limit:
        raise ValueError(f"token_ids: need 0 < min_size <= max_size <= max_position_embeddings ({limit}), got "
                         f"{min_size}, {max_size}")
    return st.lists(st.integers(0, config.vocab_size - 1), min_size=min_size, max_size=max_size)


__all__ = ["Checkpoint", "llama_checkpoints", "llama_configs", "random_weights", "rope_scalings",
           "shard_layouts", "token_ids", "write_checkpoint"]
