"""The figures docs/sharding.md plans with: one decoder layer's decode-step time at a real model's shape, and what
handing the residual stream from Ray actor to actor adds to each step.

    python tools/measure_pipeline.py layer [--dtype float64] [--context 1024]   # a Llama 3.1 70B layer, numpy
    python tools/measure_pipeline.py hops [--tokens 64]                          # per-stage cost on a local Ray

`layer` builds ONE random layer with Llama 3.1 70B's shapes (6.9 GB in float64) and times `forward_layers` for a
single new token after `context` cached ones, on the numpy backend; a stage's decode step is that times its layers.
`hops` decodes the same tiny random model unsharded, in 2 and in 3 Ray actors, and prints the extra milliseconds
per token that each actor stage adds (its task call and the hand-off of the residual stream).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


def layer_time(dtype: str, context: int, reps: int) -> dict:
    from refllama.backends import get_backend
    from refllama.config import LlamaConfig
    from refllama.model.kv_cache import KVCache
    from refllama.model.llama import LlamaModel
    from refllama.model.weights import AttentionWeights, LayerWeights, Linear, MLPWeights, WeightMap

    from make_sparse_checkpoint import LLAMA_31_70B

    config = LlamaConfig.from_dict({**LLAMA_31_70B, "num_hidden_layers": 1, "vocab_size": 256})
    backend = get_backend("numpy", dtype)
    rng = np.random.default_rng(0)
    H, inter, D = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D

    def matrix(rows: int, cols: int) -> Linear:
        return Linear(rng.standard_normal((rows, cols), dtype=np.float32).astype(backend.np_dtype) * 0.01)

    layer = LayerWeights(AttentionWeights(matrix(q, H), matrix(kv, H), matrix(kv, H), matrix(H, q)),
                         MLPWeights(matrix(inter, H), matrix(inter, H), matrix(H, inter)),
                         np.ones(H, backend.np_dtype), np.ones(H, backend.np_dtype))
    weights = WeightMap(None, [layer], np.ones(H, backend.np_dtype), None)
    model = LlamaModel(config, weights, backend)
    nbytes = sum(a.nbytes for a in weights.tensors())
    cache = KVCache(backend, 1, 1, config.num_key_value_heads, context + 1, D)
    cache.length = context  # as if `context` tokens were cached
    x = backend.asarray(rng.standard_normal((1, 1, H)))
    step = model.step_inputs((1, 1), context)
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        model.forward_layers(x, 0, 1, cache, step)
        times.append(time.perf_counter() - start)
    ms = 1e3 * statistics.median(times[1:])  # the first run warms the caches
    return {"dtype": dtype, "context": context, "layer_bytes": nbytes, "ms_per_layer": ms,
            "gb_per_s": nbytes / (ms / 1e3) / 1e9, "reps": reps}


def hop_time(tokens: int) -> dict:
    import ray
    from safetensors.numpy import save_file

    import refllama

    from make_fixtures import _BASE, make_weights

    config = {**_BASE, "num_hidden_layers": 6, "max_position_embeddings": 512}
    folder = Path(tempfile.mkdtemp())
    (folder / "config.json").write_text(json.dumps(config))
    save_file(make_weights(config, seed=0), str(folder / "model.safetensors"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = {}
    engines = {"unsharded": refllama.load(folder)}
    for shards in (2, 3):
        engines[f"{shards} actors"] = refllama.load(folder, shards=shards, cluster="ray")
    for name, engine in engines.items():
        engine.generate_ids([1, 2, 3], 4, stop_at_eos=False)  # warm up
        start = time.perf_counter()
        engine.generate_ids([1, 2, 3], tokens, stop_at_eos=False)
        out[name] = 1e3 * (time.perf_counter() - start) / tokens
    base = out["unsharded"]
    per_stage = {k: (v - base) / int(k[0]) for k, v in out.items() if k[0].isdigit()}
    result = {"ms_per_token": out, "ms_per_stage": per_stage}
    ray.shutdown()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("layer", "hops"))
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    result = layer_time(args.dtype, args.context, args.reps) if args.what == "layer" else hop_time(args.tokens)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
