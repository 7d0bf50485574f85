"""From a path on disk to what an engine is made of: format detection, the config, the weights as stored, the
tokenizer; and memory admission before anything large is allocated.

Nothing here computes: the weights come back as host arrays in their stored dtype (memory-mapped views), and the
engine hands them to the backend.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from refllama.backends import Backend
from refllama.config import LlamaConfig
from refllama.diagnostics.diagnostic import ModelDiagnostic
from refllama.diagnostics.memory import BackendConfig, MemoryLimitError, MemoryManager, estimate, stage_plan
from refllama.dtypes import LayerDataTypeConfig
from refllama.errors import CheckpointError, TokenizerError
from refllama.formats.checkpoint import load_weight_map
from refllama.formats.files import ModelFolder
from refllama.formats.finite import check_weights
from refllama.formats.ggml_quants import GGMLType
from refllama.formats.gguf import GGUFFile
from refllama.formats.gguf_llama import GGUFTensorSource, config_from_gguf
from refllama.formats.safetensors import TensorSource, mapped_base, release_pages
from refllama.formats.tokenizer import LlamaTokenizer
from refllama.model.weights import StageSpan, WeightMap, map_arrays
from refllama.quant.quantize import quantize_lm_head
from refllama.sharding.plan import StagePlan

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class ModelFiles:
    """A model as read from disk: its config, its weights as stored, and its tokenizer (None without one)."""

    config: LlamaConfig
    weights: WeightMap
    tokenizer: LlamaTokenizer | None


def read_model(path: str | Path, backend: Backend | None, *, dequantize: bool = False, quant_semantics: str = "hf",
               layer_dtypes: LayerDataTypeConfig | None = None, span: StageSpan | None = None,
               tokenizer: bool = True, allow_symlinks: bool = False, verify: bool = True,
               lm_head_dtype: str | None = None) -> ModelFiles:
    """A Hugging Face model folder or a GGUF file, checked against its config, its weights left as stored.

    GGUF blocks of the types `backend.reads_as_stored` names stay in their blocks (unless `dequantize`, or
    per-layer data types that re-derive the weights from float); the rest become float32. `dequantize` makes
    weight-only quantized Linears float32 at load (W8A8 keeps its integer GEMM: dequantizing it would change the
    function); `quant_semantics` ("hf", "vllm") is how W8A8 Linears quantize their inputs. `layer_dtypes` is
    recorded in the config (the engine applies it). A `span` (a pipeline stage) reads only its own tensors, and
    of a sharded folder only the shard files that hold them; a stage needs no `tokenizer` either. `backend` None
    (a driver that computes nothing) keeps no GGUF blocks. A folder's files must lie inside it; `allow_symlinks`
    trusts its symlinks wherever they point (refllama/formats/files.py). `verify` checks that every float weight
    is finite (NumericalError naming the first that is not; refllama/formats/finite.py). `lm_head_dtype` ("int8")
    quantizes a float head at load (refllama/quant/quantize.py, `quantize_lm_head`).
    """
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        gguf = GGUFFile(path)
        config = config_from_gguf(gguf)
        tok = LlamaTokenizer.from_gguf_metadata(gguf.metadata, source=path) \
            if tokenizer and "tokenizer.ggml.model" in gguf.metadata else None
        gguf.release_header()
        keep = frozenset() if dequantize or layer_dtypes is not None or backend is None \
            else stored_block_types(backend)
        source: TensorSource | GGUFTensorSource = GGUFTensorSource(gguf, config, keep)
    elif path.is_dir():
        config = LlamaConfig.from_dir(path, allow_symlinks=allow_symlinks)
        folder = ModelFolder(path, allow_symlinks=allow_symlinks)
        has_tokenizer = tokenizer and any(folder.file(f, TokenizerError) is not None for f in TOKENIZER_FILES)
        tok = LlamaTokenizer.from_dir(path, allow_symlinks=allow_symlinks) if has_tokenizer else None
        wanted = None if span is None else partial(span.holds, tied=config.tie_word_embeddings)
        source = TensorSource(path, wanted, allow_symlinks=allow_symlinks)
    else:
        raise CheckpointError("not a model folder (a directory with config.json) or a .gguf file", path)
    if tok is not None and tok.vocab_size > config.vocab_size:
        raise TokenizerError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary (its "
                             f"embedding table) has {config.vocab_size}: ids past it could never be run",
                             tok.path or path)
    if layer_dtypes is not None:
        config = replace(config, layer_dtypes=layer_dtypes)
    weights = load_weight_map(source, config, dequantize=dequantize, activation_semantics=quant_semantics,
                              span=span)
    if verify:
        check_weights(weights, path)
    if lm_head_dtype is not None:
        weights = quantize_lm_head(weights, lm_head_dtype, quant_semantics)
    return ModelFiles(config, weights, tok)


def take_weights(weights: WeightMap, backend: Backend,
                 progress: Callable[[int, int], None] | None = None) -> WeightMap:
    """The backend's copy of every tensor; a converted tensor's mapped pages are let go at once, so a load peaks
    near the converted size. `progress(done, total)` is called tensor by tensor."""
    total, done = len(weights.tensors()), 0
    files: dict[int, mmap.mmap] = {}  # the mapped files tensors were copied from, by id

    def take(stored: np.ndarray, streamed: bool = True):
        nonlocal done
        array = backend.take_weight(stored) if streamed else backend.asarray(stored)
        if array is not stored:
            release_pages(stored)
            base = mapped_base(stored)
            if base is not None:
                files[id(base)] = base
        done += 1
        if progress is not None:
            progress(done, total)
        return array

    # An untied embedding table is only looked up (a forward pass reads its tokens' rows), so it is not taken where
    # the backend keeps what a decode step streams (the numba backend's huge pages: 108 MiB more for SmolLM2).
    embeddings = map_arrays(weights.embeddings, partial(take, streamed=weights.lm_head is None))
    taken = replace(replace(weights, embeddings=None).map(take), embeddings=embeddings)
    # Reading a tensor maps whole page-cache folios around it, pages of tensors already let go among them: once all
    # are taken, let go of every file a tensor was copied from (what still reads it faults its pages back in).
    for base in files.values():
        release_pages(np.frombuffer(base, np.uint8))
    return taken


def stored_block_types(backend: Backend) -> frozenset[GGMLType]:
    """The GGUF block types `backend` reads as stored (kept memory-mapped as GGUFBlockWeight at load)."""
    return frozenset(t for t in GGMLType if t.name in backend.reads_as_stored)


def admit(diagnostic: ModelDiagnostic, backend_config: BackendConfig) -> MemoryManager:
    """A MemoryManager holding the estimate for this backend, precision, context and batch; MemoryLimitError,
    carrying the recommendations, when it does not fit the configured limit."""
    bc = backend_config
    requirements = estimate(diagnostic.config, diagnostic.weight_info, bc.backend, bc.precision,
                            bc.context_length, bc.batch_size, memory_limit=bc.memory_limit,
                            vocab_entries=diagnostic.tokenizer_info.vocab_size or 0)
    manager = MemoryManager(bc.memory_limit)
    manager.reserve(requirements)
    return manager


def admit_stages(diagnostic: ModelDiagnostic, backend_config: BackendConfig) -> StagePlan:
    """The stage plan of `backend_config.shards`; with a memory limit (per stage, i.e. per node or device), a
    MemoryLimitError when a stage does not fit it, carrying the whole model's recommendations."""
    bc = backend_config
    plan = stage_plan(diagnostic.config, diagnostic.weight_info, bc.shards, bc.backend, bc.precision,
                      bc.context_length, bc.batch_size, bc.memory_limit)
    if bc.memory_limit is not None and max(plan.memory_bytes) > bc.memory_limit:
        requirements = estimate(diagnostic.config, diagnostic.weight_info, bc.backend, bc.precision,
                                bc.context_length, bc.batch_size, memory_limit=bc.memory_limit,
                                vocab_entries=diagnostic.tokenizer_info.vocab_size or 0)
        raise MemoryLimitError(requirements, bc.memory_limit)
    return plan
