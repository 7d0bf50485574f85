"""Write a sparse checkpoint shaped like Llama 3.1 70B: real safetensors headers and index, data left as holes.

Each of the 30 shards is an 8-byte header length, a real JSON header and a data region made with `truncate`,
so the folder claims ~141 GB but takes a few megabytes of disk. Diagnostics must analyse it from headers alone.

    python tools/make_sparse_checkpoint.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import math
import struct
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


def write(out: Path, config: dict = LLAMA_31_70B, shards: int = SHARDS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(config)
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
    (out / "config.json").write_text(json.dumps({**config, "_name_or_path": "meta-llama/Llama-3.1-70B-Instruct"},
                                                indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000,
                                                            "eos_token_id": [128001, 128008, 128009]}))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="the folder to write (created)")
    print(write(parser.parse_args().out_dir))
