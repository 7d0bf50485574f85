"""The forward pass and its parts: `llama.py` (the model, top to bottom), `ops.py` (the reference arithmetic of
each operation), `rope.py` (RoPE tables), `kv_cache.py` (the static cache) and `weights.py` (the WeightMap).

Deliberately empty: importing `refllama.model.ops` (as the numpy backend does) must not import the model.
"""
