"""refllama: a reference inference engine for Llama-family models, written once in NumPy."""

from refllama.config import ActivationType, LlamaConfig, RopeScaling
from refllama.diagnostics.diagnostic import ModelDiagnostic
from refllama.diagnostics.memory import BackendConfig, MemoryLimitError
from refllama.dtypes import DataType, LayerDataTypeConfig
from refllama.engine import GenericLlamaEngine, generate, load
from refllama.errors import (
    BackendError,
    CheckpointError,
    ConfigError,
    InputError,
    RefLlamaError,
    TokenizerError,
    WeightError,
)
from refllama.formats.tokenizer import LlamaTokenizer, TokenizerType, load_tokenizer
from refllama.generation import GenerationRequest, GenerationResponse, TokenLogprob
from refllama.model.kv_cache import KVCache

__version__ = "0.1.0"

__all__ = [
    "ActivationType",
    "BackendConfig",
    "BackendError",
    "CheckpointError",
    "ConfigError",
    "DataType",
    "GenerationRequest",
    "GenerationResponse",
    "GenericLlamaEngine",
    "InputError",
    "KVCache",
    "LayerDataTypeConfig",
    "LlamaConfig",
    "LlamaTokenizer",
    "MemoryLimitError",
    "ModelDiagnostic",
    "RefLlamaError",
    "RopeScaling",
    "TokenLogprob",
    "TokenizerError",
    "TokenizerType",
    "WeightError",
    "generate",
    "load",
    "load_tokenizer",
]
