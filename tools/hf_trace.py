"""Dump the intermediates of a transformers Llama forward pass under refllama's trace names (needs [golden]).

    python tools/hf_trace.py MODEL --ids 1,2,3 --out hf.npz [--dtype float32|float64] [--gguf FILE]

MODEL is an HF folder (or the folder of --gguf FILE). The names and shapes are `engine.trace`'s (batch axis
dropped), so `refllama compare hf.npz MODEL --ids 1,2,3` shows the first tensor where refllama and HF diverge.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def hf_trace(model, ids: list[int]) -> dict[str, np.ndarray]:
    import torch
    from transformers.models.llama import modeling_llama as ml

    out: dict[str, np.ndarray] = {}
    hooks = []

    def keep(name):
        def hook(_module, _inputs, output):
            value = output[0] if isinstance(output, tuple) else output
            out[name] = value.detach()[0].to(torch.float64).numpy()
        return hook

    hooks.append(model.model.embed_tokens.register_forward_hook(keep("embeddings")))
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.input_layernorm.register_forward_hook(keep(f"layers.{i}.input_norm")))
        hooks.append(layer.self_attn.register_forward_hook(keep(f"layers.{i}.attention_output")))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(keep(f"layers.{i}.post_attention_norm")))
        hooks.append(layer.mlp.register_forward_hook(keep(f"layers.{i}.mlp_output")))
        hooks.append(layer.register_forward_hook(keep(f"layers.{i}.residual")))

        def v_hook(_m, _i, output, i=i, layer=layer):
            heads = layer.self_attn.config.num_key_value_heads
            v = output.detach()[0].to(torch.float64).numpy()  # (T, KV * D)
            out[f"layers.{i}.v"] = v.reshape(v.shape[0], heads, -1).transpose(1, 0, 2)
        hooks.append(layer.self_attn.v_proj.register_forward_hook(v_hook))
    hooks.append(model.model.norm.register_forward_hook(keep("final_norm")))

    rope = ml.apply_rotary_pos_emb
    calls = []

    def traced_rope(q, k, cos, sin, *args, **kwargs):
        q, k = rope(q, k, cos, sin, *args, **kwargs)
        calls.append((q.detach()[0].to(torch.float64).numpy(), k.detach()[0].to(torch.float64).numpy()))
        return q, k

    ml.apply_rotary_pos_emb = traced_rope
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits
    finally:
        ml.apply_rotary_pos_emb = rope
        for h in hooks:
            h.remove()
    for i, (q, k) in enumerate(calls):
        out[f"layers.{i}.q"], out[f"layers.{i}.k"] = q, k
        out[f"layers.{i}.residual_attention"] = out[f"layers.{i}.residual"] - out[f"layers.{i}.mlp_output"]
    out["logits"] = logits[0].to(torch.float64).numpy()
    order = ["embeddings"] + [f"layers.{i}.{n}" for i in range(len(calls)) for n in (
        "input_norm", "q", "k", "v", "attention_output", "residual_attention", "post_attention_norm",
        "mlp_output", "residual")] + ["final_norm", "logits"]
    return {name: out[name] for name in order}


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--gguf", default=None, help="a GGUF file name inside MODEL")
    args = parser.parse_args()
    kwargs = {"gguf_file": args.gguf} if args.gguf else {}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="eager", **kwargs).eval()
    trace = hf_trace(model, [int(x) for x in args.ids.split(",")])
    np.savez_compressed(args.out, **trace)
    print(f"wrote {args.out}: {len(trace)} tensors")


if __name__ == "__main__":
    main()
