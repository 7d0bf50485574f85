"""Write the tiny mixture-of-experts checkpoints (Mixtral, Llama 4 text) with transformers' own save_pretrained.

The model is built by transformers from the config (MixtralForCausalLM, Llama4ForCausalLM), its parameters are
filled from numpy's PCG64 with a fixed seed, and `save_pretrained` writes the folder, so the on-disk names and
layouts are the ones transformers writes: Mixtral's per-expert `block_sparse_moe.experts.E.w{1,2,3}`, Llama 4's
stacked `feed_forward.experts.gate_up_proj` [E, hidden, 2I] and `down_proj` [E, I, hidden]. Needs the [golden]
extra. Running it again writes the same bytes (`--check` verifies that against the committed files).

    python tools/make_moe_fixtures.py            # (re)write tests/fixtures/<name> for every MoE fixture
    python tools/make_moe_fixtures.py --check    # regenerate in a temp dir and compare bytes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "tools"))
from make_fixtures import write_or_check  # noqa: E402

_COMMON = {
    "vocab_size": 64, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 128, "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.02,
}

# name -> (architecture, config, stored dtype, seed, max shard size or None, what it exercises)
MOE_FIXTURES: dict[str, tuple[str, dict, str, int, str | None, str]] = {
    "mixtral": (
        "MixtralForCausalLM",
        {**_COMMON, "model_type": "mixtral", "intermediate_size": 32, "num_hidden_layers": 2,
         "num_local_experts": 4, "num_experts_per_tok": 2, "rope_theta": 1e6, "sliding_window": 16},
        "float32", 11, "150KB",
        "Mixtral: 4 experts, top-2, GQA 2:1, sliding window 16 (< the 48-token sequence), f32, sharded"),
    "mixtral_bf16": (
        "MixtralForCausalLM",
        {**_COMMON, "model_type": "mixtral", "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8,
         "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6, "sliding_window": None},
        "bfloat16", 12, None, "Mixtral: 8 experts, top-2, GQA 4:1, no sliding window, bf16, one file"),
    "llama4": (
        "Llama4ForCausalLM",
        {**_COMMON, "model_type": "llama4_text", "intermediate_size": 32, "intermediate_size_mlp": 96,
         "num_hidden_layers": 4, "num_local_experts": 4, "num_experts_per_tok": 1, "interleave_moe_layer_step": 2,
         "no_rope_layer_interval": 4, "attention_chunk_size": 8, "use_qk_norm": True,
         "attn_temperature_tuning": True, "floor_scale": 4, "attn_scale": 0.1, "rope_theta": 5e5},
        "float32", 13, "200KB",
        "Llama 4 text: MoE layers 1, 3 (4 experts, top-1, shared expert), dense 0, 2; layer 3 without RoPE "
        "(temperature, floor_scale 4); chunked attention (chunk 8); QK norm; GQA 2:1; f32, sharded"),
    "llama4_noqk": (
        "Llama4ForCausalLM",
        {**_COMMON, "model_type": "llama4_text", "intermediate_size": 32, "intermediate_size_mlp": 64,
         "num_hidden_layers": 3, "num_local_experts": 4, "num_experts_per_tok": 2, "moe_layers": [0, 2],
         "no_rope_layers": [1, 0, 1], "attention_chunk_size": 16, "use_qk_norm": False,
         "attn_temperature_tuning": True, "floor_scale": 8, "attn_scale": 0.2, "rope_theta": 5e5},
        "bfloat16", 14, None,
        "Llama 4 text: MoE layers 0, 2 (top-2 sigmoid), dense 1 without RoPE; no QK norm; chunk 16; bf16"),
}


def fill_parameters(model, seed: int) -> None:
    """Deterministic weights scaled so activations stay O(1): matrices ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.01),
    routers ~ N(0, 4/hidden) so the experts' scores are well apart."""
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            shape = tuple(param.shape)
            if name.endswith("norm.weight"):
                values = 1.0 + 0.1 * rng.standard_normal(shape)
            elif name.endswith("embed_tokens.weight"):
                values = rng.standard_normal(shape)
            elif name.endswith(("gate.weight", "router.weight")):
                values = 2.0 * rng.standard_normal(shape) / np.sqrt(shape[-1])
            elif name.endswith("experts.gate_up_proj") and "llama4" in type(model).__name__.lower():
                values = rng.standard_normal(shape) / np.sqrt(shape[1])  # [E, hidden, 2I]: x @ W
            elif name.endswith("experts.down_proj") and "llama4" in type(model).__name__.lower():
                values = rng.standard_normal(shape) / np.sqrt(shape[1])  # [E, I, hidden]
            else:
                values = rng.standard_normal(shape) / np.sqrt(shape[-1])  # [.., out, in]
            param.copy_(torch.from_numpy(values))


def write_fixture(name: str, out_dir: Path) -> Path:
    import torch
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    arch, config_dict, dtype, seed, shard, _ = MOE_FIXTURES[name]
    config_cls = getattr(transformers, {"MixtralForCausalLM": "MixtralConfig",
                                        "Llama4ForCausalLM": "Llama4TextConfig"}[arch])
    config = config_cls(**{k: v for k, v in config_dict.items() if k != "model_type"})
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).to(torch.float64)
    fill_parameters(model, seed)
    model = model.to(getattr(torch, dtype))
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors*"):
        old.unlink()
    model.generation_config.do_sample = False
    model.save_pretrained(folder, max_shard_size=shard or "1GB")
    # save_pretrained records the transformers version; keep the files independent of it
    for path in (folder / "config.json", folder / "generation_config.json"):
        data = json.loads(path.read_text())
        data.pop("transformers_version", None)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=FIXTURES_DIR)
    parser.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare with --out")
    parser.add_argument("names", nargs="*", default=list(MOE_FIXTURES))
    args = parser.parse_args()
    return write_or_check(args.names, args.out, args.check, write_fixture)


if __name__ == "__main__":
    sys.exit(main())
