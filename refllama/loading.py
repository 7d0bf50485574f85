"""From a path on disk to what an engine is made of: format detection, the config, the weights as stored, the
tokenizer; and memory admission before anything large is allocated.

Nothing here computes: the weights come back as host arrays in their stored dtype (memory-mapped views), and the
engine hands them to the backend.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from refllama.backends import Backend
from refllama.config import LlamaConfig
from refllama.diagnostics.diagnostic import ModelDiagnostic
from refllama.diagnostics.memory import BackendConfig, MemoryManager, estimate
from refllama.dtypes import LayerDataTypeConfig
from refllama.errors import CheckpointError, TokenizerError
from refllama.formats.checkpoint import load_weight_map
from refllama.formats.files import ModelFolder
from refllama.formats.ggml_quants import GGMLType
from refllama.formats.gguf import GGUFFile
from refllama.formats.gguf_llama import GGUFTensorSource, config_from_gguf
from refllama.formats.safetensors import TensorSource
from refllama.formats.tokenizer import LlamaTokenizer
from refllama.model.finite import check_weights
from refllama.model.weights import WeightMap

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class ModelFiles:
    """A model as read from disk: its config, its weights as stored, and its tokenizer (None without one)."""

    config: LlamaConfig
    weights: WeightMap
    tokenizer: LlamaTokenizer | None


def read_model(path: str | Path, backend: Backend, *, dequantize: bool = False, quant_semantics: str = "hf",
               layer_dtypes: LayerDataTypeConfig | None = None, allow_symlinks: bool = False,
               verify: bool = True) -> ModelFiles:
    """A Hugging Face model folder or a GGUF file, checked against its config, its weights left as stored.

    GGUF blocks of the types `backend.reads_as_stored` names stay in their blocks (unless `dequantize`, or
    per-layer data types that re-derive the weights from float); the rest become float32. `dequantize` makes
    weight-only quantized Linears float32 at load (W8A8 keeps its integer GEMM: dequantizing it would change the
    function); `quant_semantics` ("hf", "vllm") is how W8A8 Linears quantize their inputs. `layer_dtypes` is
    recorded in the config (the engine applies it). A folder's files must lie inside it; `allow_symlinks` trusts
    its symlinks wherever they point (refllama/formats/files.py). `verify` checks that every float weight is
    finite (NumericalError naming the first that is not; refllama/model/finite.py).
    """
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        gguf = GGUFFile(path)
        config = config_from_gguf(gguf)
        tokenizer = LlamaTokenizer.from_gguf_metadata(gguf.metadata, source=path) \
            if "tokenizer.ggml.model" in gguf.metadata else None
        keep = frozenset() if dequantize or layer_dtypes is not None else stored_block_types(backend)
        source: TensorSource | GGUFTensorSource = GGUFTensorSource(gguf, config, keep)
    elif path.is_dir():
        config = LlamaConfig.from_dir(path, allow_symlinks=allow_symlinks)
        folder = ModelFolder(path, allow_symlinks=allow_symlinks)
        has_tokenizer = any(folder.file(f, TokenizerError) is not None for f in TOKENIZER_FILES)
        tokenizer = LlamaTokenizer.from_dir(path, allow_symlinks=allow_symlinks) if has_tokenizer else None
        source = TensorSource(path, allow_symlinks=allow_symlinks)
    else:
        raise CheckpointError("not a model folder (a directory with config.json) or a .gguf file", path)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary (its "
                             f"embedding table) has {config.vocab_size}: ids past it could never be run",
                             tokenizer.path or path)
    if layer_dtypes is not None:
        config = replace(config, layer_dtypes=layer_dtypes)
    weights = load_weight_map(source, config, dequantize=dequantize, activation_semantics=quant_semantics)
    if verify:
        check_weights(weights, path)
    return ModelFiles(config, weights, tokenizer)


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
