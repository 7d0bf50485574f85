"""GenericLlamaEngine: a loaded model on a backend, with the public entry points (logits, trace, generation)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from refllama.backends import Backend, get_backend
from refllama.config import LlamaConfig
from refllama.diagnostics.diagnostic import ModelDiagnostic
from refllama.diagnostics.memory import AllocationError, BackendConfig, MemoryManager, kv_cache_bytes
from refllama.dtypes import DataType, LayerDataTypeConfig
from refllama.errors import InputError, brief
from refllama.formats.checkpoint import layer_linear_weights
from refllama.formats.default_model import default_model_path
from refllama.formats.tokenizer import LlamaTokenizer
from refllama.generation import GenerationRequest, GenerationResponse, decode
from refllama.generation.requests import Message
from refllama.loading import admit, admit_stages, read_model, take_weights
from refllama.model.kv_cache import KVCache
from refllama.model.llama import LlamaModel
from refllama.model.weights import StageSpan, WeightMap
from refllama.quant.quantize import LM_HEAD_DTYPES, apply_layer_dtypes
from refllama.sharding.stages import Pipeline, PipelineCache, plan_model

if TYPE_CHECKING:
    from refllama.sharding.ray_stages import RayCache, RayPipeline

DEFAULT_STAGE_TIMEOUT = 600.0  # seconds one stage may take for one forward call before StageError


class GenericLlamaEngine:
    def __init__(self, config: LlamaConfig, weights: WeightMap | None, backend: Backend | None,
                 tokenizer: LlamaTokenizer | None = None, progress: Callable[[int, int], None] | None = None,
                 *, quant_semantics: str = "hf", batch_size: int | None = None,
                 pipeline: Pipeline | RayPipeline | None = None):
        """`weights` as loaded (host arrays in their stored dtype); the backend converts them once, reporting
        `progress(done, total)` tensor by tensor. `config.layer_dtypes`, when set, quantizes or rounds them per
        layer first (refllama/quant/quantize.py); the loaded map is kept as `source_weights` for `set_precision`.
        `batch_size` caps the rows `generate` runs as one batch (None: all requests at once). A sharded engine
        has no weights or backend of its own: its `pipeline` of stages (refllama/sharding) runs the forward pass.
        """
        self.config = config
        self.backend = backend
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.memory_manager = MemoryManager()
        self.pipeline = pipeline
        self.source_weights = weights  # as loaded (mostly views of the files): set_precision re-derives from these
        self.model: LlamaModel | None = None
        self.lm_head_dtype: str | None = None  # set by `load` when the head was quantized at load
        if pipeline is not None:
            return
        if weights is None or backend is None:
            raise InputError("an engine needs weights and a backend, or a pipeline of stages")
        if config.layer_dtypes is not None:
            weights = apply_layer_dtypes(weights, config.layer_dtypes, semantics=quant_semantics)
        self.model = LlamaModel(config, self._take(weights, progress), backend)

    def _take(self, weights: WeightMap, progress: Callable[[int, int], None] | None = None) -> WeightMap:
        return take_weights(weights, self.backend, progress)

    @classmethod
    def load(cls, path: str | Path, backend: str = "numpy", dtype: str | DataType = "float32",
             progress: Callable[[int, int], None] | None = None, *, dequantize: bool = False,
             quant_semantics: str = "hf", layer_dtypes: LayerDataTypeConfig | None = None,
             batch_size: int | None = None, shards: int | Sequence[int] | None = None,
             devices: Sequence[str] | None = None, cluster: str | None = None,
             ray_address: str | None = None, ray_num_cpus: int | None = None,
             ray_actor_options: dict[str, Any] | None = None, stage_timeout: float = DEFAULT_STAGE_TIMEOUT,
             verify: bool = True, allow_symlinks: bool = False,
             lm_head_dtype: str | None = None) -> GenericLlamaEngine:
        """A Hugging Face model folder or a GGUF file, on `backend`, computing in `dtype`.

        Quantized checkpoints stay quantized unless `dequantize` (weight-only formats and GGUF blocks, to float32
        at load); `quant_semantics` ("hf" or "vllm") is how W8A8 Linears quantize their inputs; `layer_dtypes`
        applies per-layer data types to a float checkpoint (docs/quantization.md). `verify=False` skips the check
        that every weight is finite; `allow_symlinks` trusts symlinks in the folder that lead out of it
        (docs/security.md). `lm_head_dtype="int8"` quantizes a float head at load like a W8A8 checkpoint's Linears
        (per-channel symmetric int8, per-token int8 inputs); `describe()` says so.

        Pipeline sharding (docs/sharding.md): `shards` splits the layers into that many stages balanced by bytes,
        or at explicit split points [0, ..., layers]; `devices` ("cuda:0", ...) places one stage on each (cupy);
        `cluster="ray"` runs each stage in a Ray actor (at `ray_address` or RAY_ADDRESS, else a local Ray started
        with `ray_num_cpus`; `ray_actor_options` such as {"num_cpus": 16} size the actors); a stage that dies or
        takes over `stage_timeout` seconds raises StageError."""
        _check_load_options(path, dequantize=dequantize, quant_semantics=quant_semantics, batch_size=batch_size,
                            verify=verify, allow_symlinks=allow_symlinks, lm_head_dtype=lm_head_dtype)
        if shards is not None or devices is not None or cluster is not None:
            if lm_head_dtype is not None:
                raise InputError("lm_head_dtype cannot be combined with shards yet")
            return cls._load_sharded(path, backend, dtype, shards, devices, cluster, batch_size=batch_size,
                                     dequantize=dequantize, quant_semantics=quant_semantics,
                                     layer_dtypes=layer_dtypes, ray_address=ray_address, ray_num_cpus=ray_num_cpus,
                                     ray_actor_options=ray_actor_options, stage_timeout=stage_timeout)
        ops = get_backend(backend, dtype)  # fail on a bad backend or dtype before touching the weights
        files = read_model(path, ops, dequantize=dequantize, quant_semantics=quant_semantics,
                           layer_dtypes=layer_dtypes, allow_symlinks=allow_symlinks, verify=verify,
                           lm_head_dtype=lm_head_dtype)
        engine = cls(files.config, files.weights, ops, files.tokenizer, progress, quant_semantics=quant_semantics,
                     batch_size=batch_size)
        engine.lm_head_dtype = lm_head_dtype
        return engine

    @classmethod
    def _load_sharded(cls, path: str | Path, backend: str, dtype: str | DataType, shards: int | Sequence[int] | None,
                      devices: Sequence[str] | None, cluster: str | None, *, batch_size: int | None,
                      layer_dtypes: LayerDataTypeConfig | None, ray_address: str | None, ray_num_cpus: int | None,
                      ray_actor_options: dict[str, Any] | None, stage_timeout: float,
                      **options: Any) -> GenericLlamaEngine:
        """The driver reads the config and tokenizer only; each stage reads its own tensors."""
        if layer_dtypes is not None:
            raise InputError("per-layer data types (layer_dtypes) cannot be combined with shards yet")
        if cluster not in (None, "ray"):
            raise InputError(f"cluster={cluster!r}: the one cluster refllama runs on is 'ray'")
        if shards is None:
            shards = len(devices) if devices is not None else 1
        files = read_model(path, None, span=StageSpan(0, 0, embeds=False, head=False))  # config and tokenizer
        plan = plan_model(path, files.config, shards, backend, DataType.parse(dtype))
        if cluster == "ray":
            if devices is not None:
                raise InputError("devices= places stages within this process; on Ray each actor uses its node's "
                                 "default device")
            from refllama.sharding.ray_stages import RayPipeline  # Ray is an optional extra

            pipeline: Pipeline | RayPipeline = RayPipeline.start(
                path, files.config, plan, backend, dtype, address=ray_address, num_cpus=ray_num_cpus,
                timeout=stage_timeout, actor_options=ray_actor_options, **options)
        else:
            pipeline = Pipeline.load(path, files.config, plan, backend, dtype, devices, **options)
        return cls(files.config, None, None, files.tokenizer, batch_size=batch_size, pipeline=pipeline)

    def describe(self) -> str:
        """What runs, in one line: backend, compute dtype, the Linears' storage and the head's (and whether the
        head was quantized at load), so no precision change is silent."""
        c = self.config
        if self.pipeline is not None:
            return f"{c.model_type}, {c.num_hidden_layers} layers, sharded in {self.pipeline.plan.num_stages} stages"
        from refllama.quant.quantize import describe_weight

        linears = sorted({describe_weight(lin.weight) for layer in self.model.weights.layers
                          for lin in layer_linear_weights(layer)})
        head = describe_weight(self.model.lm_head.weight)
        if self.lm_head_dtype is not None:
            head += f" (quantized at load: lm_head_dtype={self.lm_head_dtype!r})"
        elif self.model.weights.lm_head is None:
            head += " (tied to the embeddings)"
        return (f"{c.model_type}, {c.num_hidden_layers} layers on {self.backend.name} {self.backend.dtype.value}; "
                f"Linears: {', '.join(linears)}; lm_head: {head}")

    def __repr__(self) -> str:
        return f"GenericLlamaEngine({self.describe()})"

    def close(self) -> None:
        """Release the stages (a Ray pipeline's actors are killed); an unsharded engine holds nothing to close."""
        if self.pipeline is not None:
            self.pipeline.close()

    def __enter__(self) -> GenericLlamaEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_precision(self, layer_dtypes: LayerDataTypeConfig, *, group_size: int | None = 128,
                      quant_semantics: str = "hf") -> None:
        """Re-derive the weights from the kept source with new per-layer data types; no file is reread."""
        if self.pipeline is not None:
            raise InputError("set_precision re-derives an unsharded engine's weights; reload a sharded one")
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
        if bc.shards is not None:  # the limit is per stage (per node)
            plan = admit_stages(diagnostic, bc)
            return cls.load(diagnostic.model_path, backend=bc.backend, dtype=bc.precision,
                            dequantize=not bc.quantization_support, layer_dtypes=diagnostic.config.layer_dtypes,
                            batch_size=bc.batch_size, shards=plan.bounds)
        manager = admit(diagnostic, bc)
        engine = cls.load(diagnostic.model_path, backend=bc.backend, dtype=bc.precision, progress=progress,
                          dequantize=not bc.quantization_support, layer_dtypes=diagnostic.config.layer_dtypes,
                          batch_size=bc.batch_size)
        engine.memory_manager = manager
        return engine

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache | PipelineCache | RayCache:
        """An empty KV cache (a sharded engine's: one per stage); max_len defaults to max_position_embeddings. Its
        size is checked against the memory limit (when one is set) before it is allocated, and an allocation that
        fails raises AllocationError."""
        c = self.config
        max_len = c.max_position_embeddings if max_len is None else max_len
        for name, value in (("batch", batch), ("max_len", max_len)):
            if not _is_int(value) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {brief(value)}")
        if self.pipeline is not None:
            return self.pipeline.new_cache(batch, max_len)
        what = f"a KV cache of {batch} x {max_len} tokens"
        self.memory_manager.check(kv_cache_bytes(c, self.backend.dtype, max_len, batch), what)
        try:
            return KVCache(self.backend, c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim)
        except MemoryError:
            raise AllocationError(f"{what} cannot be allocated (out of memory)") from None

    def forward(self, token_ids: np.ndarray, cache: KVCache, attention_mask: np.ndarray | None = None,
                positions: np.ndarray | None = None, last_only: bool = False) -> np.ndarray:
        """Logits (B, T, vocab) as a host array for ids (B, T) following what `cache` holds.

        attention_mask (B, cache.length + T): 1 for real tokens, 0 for padding; positions (B, T): RoPE positions
        (default: cache.length + arange(T)); last_only: the last position's logits only, (B, 1, vocab).
        """
        ids = self.check_ids(token_ids, ndim=2)
        if self.pipeline is not None:
            return self.pipeline.forward(ids, cache, attention_mask, positions, last_only)
        return self.backend.to_numpy(self.model.forward(ids, cache, attention_mask, positions,
                                                        last_only=last_only))

    def trace(self, token_ids: Sequence[int] | np.ndarray, decode_from: int | None = None) -> dict[str, np.ndarray]:
        """Every intermediate of one forward pass over one sequence, by stable name, as host arrays without the
        batch axis: embeddings (T, hidden); per layer N: layers.N.input_norm, .q / .k (after RoPE) and .v
        (KV heads for k and v: (heads, T, head_dim)), .attention_output (after o_proj), .residual_attention,
        .post_attention_norm, .mlp_output and .residual (T, hidden); final_norm (T, hidden); logits (T, vocab).
        MoE layers add .router_logits (T, experts), .experts (T, k: the chosen experts, best first) and
        .expert_weights (T, k).

        `decode_from=n` traces the KV-cache path instead: ids[:n] as one prefill, then each later id as a
        one-token step through the cache; every tensor is joined over positions, so the names and shapes are
        those of the full pass and the two traces compare position by position (docs/trace-format.md)."""
        ids = self.check_ids(token_ids, ndim=1)
        n = len(ids) if decode_from is None else decode_from
        if not 1 <= n <= len(ids):
            raise InputError(f"decode_from must be in [1, {len(ids)}] for {len(ids)} ids, got {decode_from}")
        cache = self.new_cache(1, len(ids))
        forward = self.model.forward if self.pipeline is None else self.pipeline.forward
        to_host = self.backend.to_numpy if self.pipeline is None else np.asarray  # a pipeline traces host arrays
        steps: list[dict] = []
        for start, end in [(0, n)] + [(t, t + 1) for t in range(n, len(ids))]:
            steps.append({})
            forward(ids[None, start:end], cache, trace=steps[-1])
        # q, k, v are (heads, T, head_dim) once the batch axis is dropped: positions on axis 1, else axis 0.
        return {name: np.concatenate([to_host(step[name])[0] for step in steps],
                                     axis=1 if name.rsplit(".", 1)[-1] in ("q", "k", "v") else 0)
                for name in steps[0]}

    def logits(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits for every position of one sequence, (T, vocab), from one full forward pass."""
        ids = self.check_ids(token_ids, ndim=1)
        cache = self.new_cache(1, len(ids))
        logits = self.forward(ids[None, :], cache)
        decode.check_finite(self, logits, lambda _: ids)
        return logits[0]

    def generate_ids(self, token_ids: Sequence[int] | np.ndarray, max_new_tokens: int,
                     stop_at_eos: bool = True) -> list[int]:
        """Greedy decoding through the KV cache; returns the new ids (ending with the eos id if one stopped it).
        At most max_new_tokens, and never past the context (max_position_embeddings), as `generate`."""
        ids = self.check_ids(token_ids, ndim=1)
        decode.check_max_new_tokens(max_new_tokens)
        if not isinstance(stop_at_eos, bool):
            raise InputError(f"stop_at_eos must be True or False, got {brief(stop_at_eos)}")
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
        try:
            ids = np.asarray(token_ids)
        except (ValueError, TypeError, OverflowError) as e:  # ragged lists, ints beyond int64, ...
            raise InputError(f"token ids must be a {ndim}-d sequence of integers ({e})") from None
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


def _check_load_options(path: Any, *, dequantize: Any, quant_semantics: Any, batch_size: Any, verify: Any,
                        allow_symlinks: Any, lm_head_dtype: Any = None) -> None:
    """InputError naming the first load argument of the wrong type or out of range."""
    if not isinstance(path, (str, Path)):
        raise InputError(f"path must be a str or a Path, got {type(path).__name__}")
    for name, value in (("dequantize", dequantize), ("verify", verify), ("allow_symlinks", allow_symlinks)):
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {brief(value)}")
    if quant_semantics not in ("hf", "vllm"):
        raise InputError(f"quant_semantics must be 'hf' or 'vllm', got {brief(quant_semantics)}")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise InputError(f"batch_size must be a positive integer or None, got {brief(batch_size)}")
    if lm_head_dtype is not None and lm_head_dtype not in LM_HEAD_DTYPES:
        raise InputError(f"lm_head_dtype must be one of {LM_HEAD_DTYPES} or None, got {brief(lm_head_dtype)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def load(path: str | Path | None = None, backend: str = "numpy", dtype: str | DataType = "float32",
         progress: Callable[[int, int], None] | None = None, **options: Any) -> GenericLlamaEngine:
    """Load a Hugging Face Llama folder or GGUF file (None: the embedded default model) onto a backend;
    `progress(done, total)` is called as each weight tensor is taken in. `options`: dequantize,
    quant_semantics, layer_dtypes, lm_head_dtype, batch_size, verify, allow_symlinks, and for pipeline sharding
    shards, devices, cluster, ray_address, ray_num_cpus, ray_actor_options, stage_timeout (GenericLlamaEngine.load;
    docs/sharding.md)."""
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
