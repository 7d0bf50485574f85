"""Write the tiny random Llama checkpoints the golden tests run on, as real Hugging Face folders.

Deterministic: each fixture's weights come from numpy's PCG64 with a fixed seed, so running this again writes
the same bytes (`--check` verifies that against the committed files). Each fixture exercises one feature of the
architecture; together they cover the configuration options the forward pass branches on.

    python tools/make_fixtures.py            # (re)write tests/fixtures/
    python tools/make_fixtures.py --check    # regenerate in a temp dir and compare bytes
"""

from __future__ import annotations

import argparse
import filecmp
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = ROOT / "tests" / "fixtures"

DROP = object()  # an override that removes a key of _BASE

_BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
    "initializer_range": 0.02,
}

# name -> (config overrides, stored dtype, seed, number of shards, what it exercises)
FIXTURES: dict[str, tuple[dict, str, int, int, str]] = {
    "llama32": (
        {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rope_theta": 500000.0,
         "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32},
         "tie_word_embeddings": True, "eos_token_id": [2, 3, 4], "torch_dtype": "bfloat16"},
        "bfloat16", 1, 1, "Llama-3.2-like: GQA 2:1, head_dim 16, theta 5e5, llama3 rope scaling, tied, 3 eos, bf16"),
    "tinyllama": (
        {"num_attention_heads": 8, "num_key_value_heads": 2, "torch_dtype": "float16"},
        "float16", 2, 1, "TinyLlama/Llama-2-like: GQA 4:1, theta 1e4, untied, f16"),
    "mha_linear": (
        {"num_key_value_heads": 4, "rope_scaling": DROP, "rope_theta": DROP, "torch_dtype": DROP,
         "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, "dtype": "float32"},
        "float32", 3, 1, "MHA, linear rope scaling, written in the transformers v5 config dialect, f32"),
    "dynamic": (
        {"max_position_embeddings": 32, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
        "float32", 4, 1, "dynamic NTK rope scaling with max_position_embeddings 32, f32"),
    "bias": (
        {"attention_bias": True, "mlp_bias": True},
        "float32", 5, 1, "attention_bias and mlp_bias, f32"),
    "head_dim": (
        {"head_dim": 24},
        "float32", 6, 1, "explicit head_dim 24 != hidden/heads 16, f32"),
    "sharded": (
        {"num_key_value_heads": 1},
        "float32", 7, 2, "multi-query attention, split over two shards with an index file, f32"),
    "gelu": (
        {"hidden_act": "gelu"},
        "float32", 8, 1, "exact (erf) GELU in place of SiLU, f32"),
    # The three below vary the remaining constants, so that a wrong constant in an engine fails on at least two
    # fixtures (tests/test_constant_mutations.py).
    "eps6_theta1m": (
        {"rms_norm_eps": 1e-6, "rope_theta": 1e6},
        "float32", 9, 1, "Qwen2/Mistral-like constants: rms_norm_eps 1e-6, rope_theta 1e6, small (std 0.02) "
                         "embeddings, f32"),
    "llama31": (
        {"head_dim": 32, "rope_theta": 500000.0, "attention_bias": True,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32}},
        "float32", 10, 1, "Llama-3.1-like: llama3 rope scaling (factor 8, original context 32: high, medium and "
                          "low frequencies), theta 5e5, head_dim 32 != hidden/heads 16, attention bias without MLP "
                          "bias, small (std 0.02) embeddings, untied, f32"),
    "dynamic_tied": (
        {"max_position_embeddings": 28, "rope_theta": 500000.0, "num_key_value_heads": 1,
         "tie_word_embeddings": True, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
        "float32", 11, 1, "dynamic NTK rope scaling (factor 4) past max_position_embeddings 28, theta 5e5, MQA, "
                          "tied, f32"),
}

# Embedding standard deviation where it is not the default (1 untied, 1/sqrt(hidden) tied): trained models'
# embeddings are small, and only then does the first RMSNorm's eps change its output measurably.
EMBEDDING_STD = {"eps6_theta1m": 0.02, "llama31": 0.02}

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def fixture_config(name: str) -> dict:
    overrides = FIXTURES[name][0]
    config = {**_BASE, **overrides}
    return {k: v for k, v in config.items() if v is not DROP}


def make_weights(config: dict, seed: int, embedding_std: float | None = None) -> dict[str, np.ndarray]:
    """Random weights scaled so activations stay O(1) and logits are O(1)-O(10) (clear argmax margins)."""
    rng = np.random.default_rng(seed)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads

    def matrix(out: int, inp: int) -> np.ndarray:
        return rng.standard_normal((out, inp)) / np.sqrt(inp)

    def norm() -> np.ndarray:
        return 1.0 + 0.1 * rng.standard_normal(hidden)

    # A tied table is also the output projection: scale it like one, or each token's own embedding dominates
    # the residual stream and greedy decoding just repeats its input.
    embed_scale = 1 / np.sqrt(hidden) if config["tie_word_embeddings"] else 1.0
    embed_scale = embedding_std or embed_scale
    w = {"model.embed_tokens.weight": embed_scale * rng.standard_normal((vocab, hidden))}
    linears = {
        "self_attn.q_proj": (heads * head_dim, hidden, config["attention_bias"]),
        "self_attn.k_proj": (kv * head_dim, hidden, config["attention_bias"]),
        "self_attn.v_proj": (kv * head_dim, hidden, config["attention_bias"]),
        "self_attn.o_proj": (hidden, heads * head_dim, config["attention_bias"]),
        "mlp.gate_proj": (inter, hidden, config["mlp_bias"]),
        "mlp.up_proj": (inter, hidden, config["mlp_bias"]),
        "mlp.down_proj": (hidden, inter, config["mlp_bias"]),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        for lname, (out, inp, bias) in linears.items():
            w[p + lname + ".weight"] = matrix(out, inp)
            if bias:
                w[p + lname + ".bias"] = 0.1 * rng.standard_normal(out)
    w["model.norm.weight"] = norm()
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = matrix(vocab, hidden)
    return w


def write_fixture(name: str, out_dir: Path) -> Path:
    _, dtype, seed, shards, _ = FIXTURES[name]
    config = fixture_config(name)
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    raw = make_weights(config, seed, EMBEDDING_STD.get(name))
    weights = {k: v.astype(_NUMPY_DTYPES[dtype]) for k, v in raw.items()}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    eos = config["eos_token_id"]
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    metadata = {"format": "pt"}
    if shards == 1:
        save_file(weights, str(folder / "model.safetensors"), metadata=metadata)
        return folder
    names = sorted(weights)
    parts = np.array_split(np.arange(len(names)), shards)
    weight_map = {}
    total = 0
    for i, idx in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {names[j]: weights[names[j]] for j in idx}
        save_file(part, str(folder / fname), metadata=metadata)
        weight_map.update({n: fname for n in part})
        total += sum(a.nbytes for a in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=FIXTURES_DIR)
    parser.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare with --out")
    parser.add_argument("names", nargs="*", default=list(FIXTURES))
    args = parser.parse_args()
    return write_or_check(args.names, args.out, args.check, write_fixture)


def write_or_check(names: list[str], out: Path, check: bool, write: Callable[[str, Path], Path]) -> int:
    """Write each fixture into `out`, or (check) write them into a temp dir and compare byte for byte with `out`."""
    if not check:
        for name in names:
            print("wrote", write(name, out))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        bad = []
        for name in names:
            fresh = write(name, Path(tmp))
            files = sorted(p.name for p in fresh.iterdir())
            _, mismatch, errors = filecmp.cmpfiles(fresh, out / name, files, shallow=False)
            bad += [f"{name}/{f}" for f in mismatch + errors]
        print("fixtures identical" if not bad else f"fixtures differ: {bad}")
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
