"""GenericLlamaEngine: a loaded model on a backend, with the public entry points (logits, trace, generation)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, overload

import numpy as np

from refllama.backends import Backend, get_backend
from refllama.config import LlamaConfig
from refllama.diagnostics.diagnostic import ModelDiagnostic
from refllama.diagnostics.memory import BackendConfig, MemoryManager
from refllama.dtypes import DataType, LayerDataTypeConfig
from refllama.errors import InputError
from refllama.formats.default_model import default_model_path
from refllama.formats.safetensors import release_pages
from refllama.formats.tokenizer import LlamaTokenizer
from refllama.generation import GenerationRequest, GenerationResponse, decode
from refllama.generation.chat import Message
from refllama.loading import admit, read_model
from refllama.model.kv_cache import KVCache
from refllama.model.llama import LlamaModel
from refllama.model.weights import WeightMap
from refllama.quant.quantize import apply_layer_dtypes


class GenericLlamaEngine:
    def __init__(self, config: LlamaConfig, weights: WeightMap, backend: Backend,
                 tokenizer: LlamaTokenizer | None = None, progress: Callable[[int, int], None] | None = None,
                 *, quant_semantics: str = "hf", batch_size: int | None = None):
        """`weights` as loaded (host arrays in their stored dtype); the backend converts them once, reporting
        `progress(done, total)` tensor by tensor. `config.layer_dtypes`, when set, quantizes or rounds them per
        layer first (refllama/quant/quantize.py); the loaded map is kept as `source_weights` for `set_precision`.
        `batch_size` caps the rows `generate` runs as one batch (None: all requests at once)."""
        self.config = config
        self.backend = backend
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.memory_manager = MemoryManager()
        self.source_weights = weights  # memory-mapped views: set_precision re-derives from these
        if config.layer_dtypes is not None:
            weights = apply_layer_dtypes(weights, config.layer_dtypes, semantics=quant_semantics)
        self.model = LlamaModel(config, self._take(weights, progress), backend)

    def _take(self, weights: WeightMap, progress: Callable[[int, int], None] | None = None) -> WeightMap:
        """The backend's copy of every tensor; a converted tensor's mapped pages are let go at once."""
        total, done = len(weights.tensors()), 0

        def take(stored: np.ndarray):
            nonlocal done
            array = self.backend.asarray(stored)
            if array is not stored:
                release_pages(stored)
            done += 1
            if progress is not None:
                progress(done, total)
            return array

        return weights.map(take)

    @classmethod
    def load(cls, path: str | Path, backend: str = "numpy", dtype: str | DataType = "float32",
             progress: Callable[[int, int], None] | None = None, *, dequantize: bool = False,
             quant_semantics: str = "hf", layer_dtypes: LayerDataTypeConfig | None = None,
             batch_size: int | None = None) -> GenericLlamaEngine:
        """A Hugging Face model folder or a GGUF file, on `backend`, computing in `dtype`.

        Quantized checkpoints stay quantized unless `dequantize` (weight-only formats and GGUF blocks, to float32
        at load); `quant_semantics` ("hf" or "vllm") is how W8A8 Linears quantize their inputs; `layer_dtypes`
        applies per-layer data types to a float checkpoint (docs/quantization.md)."""
        ops = get_backend(backend, dtype)  # fail on a bad backend or dtype before touching the weights
        files = read_model(path, ops, dequantize=dequantize, quant_semantics=quant_semantics,
                           layer_dtypes=layer_dtypes)
        return cls(files.config, files.weights, ops, files.tokenizer, progress, quant_semantics=quant_semantics,
                   batch_size=batch_size)

    def set_precision(self, layer_dtypes: LayerDataTypeConfig, *, group_size: int | None = 128,
                      quant_semantics: str = "hf") -> None:
        """Re-derive the weights from the kept source with new per-layer data types; no file is reread."""
        derived = apply_layer_dtypes(self.source_weights, layer_dtypes, group_size=group_size,
                                     semantics=quant_semantics)
        self.config = replace(self.config, layer_dtypes=layer_dtypes)
        self.model = LlamaModel(self.config, self._take(derived), self.backend)

    @classmethod
    def from_diagnostic(cls, diagnostic: ModelDiagnostic, backend_config: BackendConfig | None = None,
                        progress: Callable[[int, int], None] | None = None) -> GenericLlamaEngine:
        """Load an analysed model as the backend configuration says. With a memory limit, the estimate for this
        backend, precision, context and batch is checked first: MemoryLimitError, carrying the recommendations,
        before any large allocation. `diagnostic.config.layer_dtypes`, when set, applies per-layer data types;
        `with_quantization_support(False)` dequantizes weight-only quantized weights and GGUF blocks at load;
        `with_batch_size(n)` caps the rows one `generate` call runs together."""
        bc = backend_config or BackendConfig()
        manager = admit(diagnostic, bc)
        engine = cls.load(diagnostic.model_path, backend=bc.backend, dtype=bc.precision, progress=progress,
                          dequantize=not bc.quantization_support, layer_dtypes=diagnostic.config.layer_dtypes,
                          batch_size=bc.batch_size)
        engine.memory_manager = manager
        return engine

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KV cache; max_len defaults to max_position_embeddings."""
        c = self.config
        return KVCache(self.backend, c.num_hidden_layers, batch, c.num_key_value_heads,
                       max_len or c.max_position_embeddings, c.head_dim)

    def forward(self, token_ids: np.ndarray, cache: KVCache, attention_mask: np.ndarray | None = None,
                positions: np.ndarray | None = None, last_only: bool = False) -> np.ndarray:
        """Logits (B, T, vocab) as a host array for ids (B, T) following what `cache` holds.

        attention_mask (B, cache.length + T): 1 for real tokens, 0 for padding; positions (B, T): RoPE positions
        (default: cache.length + arange(T)); last_only: the last position's logits only, (B, 1, vocab).
        """
        ids = self.check_ids(token_ids, ndim=2)
        return self.backend.to_numpy(self.model.forward(ids, cache, attention_mask, positions,
                                                        last_only=last_only))

    def trace(self, token_ids: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Every intermediate of one full forward pass over one sequence, by stable name, as host arrays without
        the batch axis: embeddings (T, hidden); per layer N: layers.N.input_norm, .q / .k (after RoPE) and .v
        (heads, T, head_dim), .attention_output, .residual_attention, .post_attention_norm, .mlp_output and
        .residual (T, hidden); final_norm (T, hidden); logits (T, vocab)."""
        ids = self.check_ids(token_ids, ndim=1)
        trace: dict = {}
        self.model.forward(ids[None, :], self.new_cache(1, len(ids)), trace=trace)
        return {name: self.backend.to_numpy(value)[0] for name, value in trace.items()}

    def logits(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits for every position of one sequence, (T, vocab), from one full forward pass."""
        ids = self.check_ids(token_ids, ndim=1)
        cache = self.new_cache(1, len(ids))
        return self.forward(ids[None, :], cache)[0]

    def generate_ids(self, token_ids: Sequence[int] | np.ndarray, max_new_tokens: int,
                     stop_at_eos: bool = True) -> list[int]:
        """Greedy decoding through the KV cache; returns the new ids (ending with the eos id if one stopped it)."""
        ids = self.check_ids(token_ids, ndim=1)
        stop = set(self.config.eos_token_id) if stop_at_eos else set()
        return decode.greedy(self, ids, max_new_tokens, stop)

    @overload
    def generate(self, request: GenerationRequest) -> GenerationResponse: ...
    @overload
    def generate(self, request: Sequence[GenerationRequest]) -> list[GenerationResponse]: ...

    def generate(self, request):
        """Generate for one request, or for a list of them as padded batches of at most `batch_size` rows (a
        response per request, in order)."""
        if isinstance(request, GenerationRequest):
            return decode.run(self, [request])[0]
        if not request or not all(isinstance(r, GenerationRequest) for r in request):
            raise InputError("generate takes a GenerationRequest or a non-empty list of them")
        requests = list(request)
        size = self.batch_size or len(requests)
        return [response for start in range(0, len(requests), size)
                for response in decode.run(self, requests[start:start + size])]

    def stream(self, request: GenerationRequest) -> Generator[str, None, GenerationResponse]:
        """The response text in pieces, as tokens arrive (no piece splits a UTF-8 character); the generator returns
        the GenerationResponse (timings included) when it ends."""
        return decode.stream(self, request)

    def check_ids(self, token_ids: Sequence[int] | np.ndarray, ndim: int = 1) -> np.ndarray:
        """Token ids as an int64 array, or InputError naming the first one outside the vocabulary."""
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


def load(path: str | Path | None = None, backend: str = "numpy", dtype: str | DataType = "float32",
         progress: Callable[[int, int], None] | None = None, **options: Any) -> GenericLlamaEngine:
    """Load a Hugging Face Llama folder or GGUF file (None: the embedded default model) onto a backend;
    `progress(done, total)` is called as each weight tensor is taken in. `options`: dequantize,
    quant_semantics, layer_dtypes, batch_size (GenericLlamaEngine.load)."""
    path = default_model_path() if path is None else path
    return GenericLlamaEngine.load(path, backend=backend, dtype=dtype, progress=progress, **options)


def generate(prompt: str | list[Message], model: str | Path | None = None, *, backend: str = "numpy",
             dtype: str | DataType = "float32", **options: Any) -> GenerationResponse:
    """Continue `prompt` (text, or chat messages) with `model` (None: the embedded default, SmolLM2-135M-Instruct).

    `options` are GenerationRequest fields (max_new_tokens, temperature, top_k, top_p, min_p, seed, stop, ...);
    greedy by default. The loaded model is kept for the next call with the same model, backend and dtype.
    """
    key = "messages" if isinstance(prompt, list) else "prompt"
    request = GenerationRequest(**{key: prompt}, **options)
    return _cached_engine(str(default_model_path() if model is None else model), backend, str(dtype)).generate(request)


@lru_cache(maxsize=1)
def _cached_engine(path: str, backend: str, dtype: str) -> GenericLlamaEngine:
    return load(path, backend=backend, dtype=dtype)
