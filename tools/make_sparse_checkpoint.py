"""Write a sparse checkpoint shaped like Llama 3.1 70B (or Mixtral 8x7B, Llama 4 Scout / Maverick text): real
safetensors headers and index, data left as holes.

Each of the 30 shards is an 8-byte header length, a real JSON header and a data region made with `truncate`,
so the folder claims ~141 GB but takes a few megabytes of disk. Diagnostics must analyse it from headers alone.

    python tools/make_sparse_checkpoint.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from pathlib import Path

# meta-llama/Llama-3.1-70B-Instruct config.json
LLAMA_31_70B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 8192,
    "initializer_range": 0.02, "intermediate_size": 28672, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 128256,
}
SHARDS = 30

# The shape fields of the published configs (mistralai/Mixtral-8x7B-v0.1; meta-llama/Llama-4-Scout-17B-16E and
# -Maverick-17B-128E text_config), with Llama 4's experts stacked as transformers stores them.
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 32768, "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-05,
    "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2, "_name_or_path": "mistralai/Mixtral-8x7B-v0.1",
}
LLAMA4_SCOUT = {
    "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "vocab_size": 202048, "hidden_size": 5120,
    "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
    "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 16, "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 1, "max_position_embeddings": 10485760, "attention_chunk_size": 8192,
    "use_qk_norm": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
    "_name_or_path": "meta-llama/Llama-4-Scout-17B-16E",
}
LLAMA4_MAVERICK = {**LLAMA4_SCOUT, "num_local_experts": 128, "interleave_moe_layer_step": 2, "use_qk_norm": False,
                   "max_position_embeddings": 1048576, "_name_or_path": "meta-llama/Llama-4-Maverick-17B-128E"}


def tensor_shapes(c: dict) -> list[tuple[str, list[int]]]:
    hd = c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = [("model.embed_tokens.weight", [c["vocab_size"], c["hidden_size"]])]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", [c["hidden_size"]]),
                   (p + "self_attn.q_proj.weight", [q, c["hidden_size"]]),
                   (p + "self_attn.k_proj.weight", [kv, c["hidden_size"]]),
                   (p + "self_attn.v_proj.weight", [kv, c["hidden_size"]]),
                   (p + "self_attn.o_proj.weight", [c["hidden_size"], q]),
                   (p + "post_attention_layernorm.weight", [c["hidden_size"]]),
                   (p + "mlp.gate_proj.weight", [c["intermediate_size"], c["hidden_size"]]),
                   (p + "mlp.up_proj.weight", [c["intermediate_size"], c["hidden_size"]]),
                   (p + "mlp.down_proj.weight", [c["hidden_size"], c["intermediate_size"]])]
    head = [("model.norm.weight", [c["hidden_size"]]), ("lm_head.weight", [c["vocab_size"], c["hidden_size"]])]
    return [*shapes, *head]


def moe_tensor_shapes(c: dict) -> list[tuple[str, list[int]]]:
    """Every tensor refllama expects for an MoE config (Llama 4's experts stacked, Mixtral's per expert)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from refllama.config import LlamaConfig
    from refllama.formats.checkpoint import expected_shapes

    shapes = expected_shapes(LlamaConfig.from_dict(c), stacked=c["model_type"] == "llama4_text")
    return [(name, list(shape)) for name, shape in shapes.items()]


def write(out: Path, config: dict = LLAMA_31_70B, shards: int = SHARDS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(config) if config["model_type"] == "llama" else moe_tensor_shapes(config)
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for tensor, shape in shapes[s * len(shapes) // shards:(s + 1) * len(shapes) // shards]:
            nbytes = 2 * math.prod(shape)
            header[tensor] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
            weight_map[tensor] = name
            offset += nbytes
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # the data region is a hole: no disk blocks
        total += offset
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-3.1-70B-Instruct", **config},
                                                indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": config["bos_token_id"],
                                                            "eos_token_id": config["eos_token_id"]}))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="the folder to write (created)")
    print(write(parser.parse_args().out_dir))
