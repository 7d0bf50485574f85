"""GenericLlamaEngine: config + weights + backend + KV cache, with the public entry points."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from refllama.backends import Backend, get_backend
from refllama.config import LlamaConfig
from refllama.default_model import default_model_path
from refllama.dtypes import DataType
from refllama.errors import CheckpointError, InputError
from refllama.formats.gguf import GGUFFile
from refllama.formats.safetensors import TensorSource, release_pages
from refllama.gguf_llama import GGUFTensorSource, config_from_gguf
from refllama.kv_cache import KVCache
from refllama.model import LlamaModel
from refllama.tokenizer import LlamaTokenizer
from refllama.weights import WeightMap, load_weight_map


class GenericLlamaEngine:
    def __init__(self, config: LlamaConfig, weights: WeightMap, backend: Backend,
                 tokenizer: LlamaTokenizer | None = None):
        """`weights` as loaded (host arrays in their stored dtype); the backend converts them once."""
        self.config = config
        self.backend = backend
        self.tokenizer = tokenizer
        self.model = LlamaModel(config, weights.map(self._take), backend)

    def _take(self, stored: np.ndarray):
        """The backend's copy of a stored tensor; a converted tensor's mapped pages are let go at once."""
        array = self.backend.asarray(stored)
        if array is not stored:
            release_pages(stored)
        return array

    @classmethod
    def load(cls, path: str | Path, backend: str = "numpy", dtype: str | DataType = "float32") -> GenericLlamaEngine:
        """A Hugging Face model folder or a GGUF file, on `backend`, computing in `dtype`."""
        path = Path(path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            gguf = GGUFFile(path)
            config = config_from_gguf(gguf)
            ops = get_backend(backend, dtype)  # fail on a bad backend or dtype before touching the weights
            tokenizer = LlamaTokenizer.from_gguf_metadata(gguf.metadata, source=path) \
                if "tokenizer.ggml.model" in gguf.metadata else None
            return cls(config, load_weight_map(GGUFTensorSource(gguf, config), config), ops, tokenizer)
        if not path.is_dir():
            raise CheckpointError("not a model folder (a directory with config.json) or a .gguf file", path)
        config = LlamaConfig.from_dir(path)
        ops = get_backend(backend, dtype)
        has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
        tokenizer = LlamaTokenizer.from_dir(path) if has_tokenizer else None
        return cls(config, load_weight_map(TensorSource(path), config), ops, tokenizer)

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KV cache; max_len defaults to max_position_embeddings."""
        c = self.config
        return KVCache(self.backend, c.num_hidden_layers, batch, c.num_key_value_heads,
                       max_len or c.max_position_embeddings, c.head_dim)

    def forward(self, token_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """Logits (B, T, vocab) as a host array for ids (B, T) following what `cache` holds."""
        ids = self._check_ids(token_ids, ndim=2)
        return self.backend.to_numpy(self.model.forward(ids, cache))

    def logits(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits for every position of one sequence, (T, vocab), from one full forward pass."""
        ids = self._check_ids(token_ids, ndim=1)
        cache = self.new_cache(1, len(ids))
        return self.forward(ids[None, :], cache)[0]

    def generate_ids(self, token_ids: Sequence[int] | np.ndarray, max_new_tokens: int,
                     stop_at_eos: bool = True) -> list[int]:
        """Greedy decoding through the KV cache; returns the new ids (ending with the eos id if one stopped it)."""
        ids = self._check_ids(token_ids, ndim=1)
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if max_new_tokens == 0:
            return []
        cache = self.new_cache(1, len(ids) + max_new_tokens)
        logits = self.forward(ids[None, :], cache)[0, -1]  # prefill
        new: list[int] = []
        while True:
            token = int(np.argmax(logits))
            new.append(token)
            if len(new) == max_new_tokens or (stop_at_eos and token in self.config.eos_token_id):
                return new
            logits = self.forward(np.array([[token]]), cache)[0, -1]  # decode one step

    def generate_text(self, prompt: str, max_new_tokens: int = 32) -> str:
        """Greedy continuation of `prompt` as text (the tokenizer adds BOS as the model's files say)."""
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer files; use generate_ids with token ids")
        new = self.generate_ids(self.tokenizer.encode(prompt), max_new_tokens)
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def _check_ids(self, token_ids: Sequence[int] | np.ndarray, ndim: int) -> np.ndarray:
        ids = np.asarray(token_ids)
        if ids.ndim != ndim or ids.size == 0 or ids.shape[-1] == 0:
            raise InputError(f"expected a non-empty {ndim}-d sequence of token ids, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"token ids must be integers, got dtype {ids.dtype}")
        bad = np.flatnonzero((ids < 0) | (ids >= self.config.vocab_size))
        if bad.size:
            where = np.unravel_index(bad[0], ids.shape)
            raise InputError(f"token id {ids[where]} at position {tuple(int(i) for i in where)} is outside the "
                             f"vocabulary [0, {self.config.vocab_size})")
        return ids.astype(np.int64, copy=False)


def load(path: str | Path | None = None, backend: str = "numpy",
         dtype: str | DataType = "float32") -> GenericLlamaEngine:
    """Load a Hugging Face Llama folder or GGUF file (None: the embedded default model) onto a backend."""
    return GenericLlamaEngine.load(default_model_path() if path is None else path, backend=backend, dtype=dtype)


def generate(prompt: str, model: str | Path | None = None, max_new_tokens: int = 32, backend: str = "numpy",
             dtype: str | DataType = "float32") -> str:
    """Greedy text continuation of `prompt` by `model` (None: the embedded default, SmolLM2-135M-Instruct)."""
    return load(model, backend=backend, dtype=dtype).generate_text(prompt, max_new_tokens)
