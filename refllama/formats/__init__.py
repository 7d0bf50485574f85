"""Reading models from disk: safetensors and GGUF files, ggml block dequantization, HF tensor names -> WeightMap
(`checkpoint.py`), GGUF -> config and names (`gguf_llama.py`), tokenizers, GGUF -> HF conversion, and the
embedded default model."""
