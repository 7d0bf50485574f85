"""refllama: a reference inference engine for Llama-family models, written once in NumPy.

The public names below are imported on first use (PEP 562), so `import refllama` and `refllama --help` stay fast:
the engine pulls in ml_dtypes, the tokenizer libraries and Jinja, which together take longer to import than the
whole command line needs. `from refllama import load` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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

# Public name -> the module that defines it: the TYPE_CHECKING imports above and __all__ below, as data.
_EXPORTS = {
    "ActivationType": "refllama.config",
    "LlamaConfig": "refllama.config",
    "RopeScaling": "refllama.config",
    "ModelDiagnostic": "refllama.diagnostics.diagnostic",
    "BackendConfig": "refllama.diagnostics.memory",
    "MemoryLimitError": "refllama.diagnostics.memory",
    "DataType": "refllama.dtypes",
    "LayerDataTypeConfig": "refllama.dtypes",
    "GenericLlamaEngine": "refllama.engine",
    "generate": "refllama.engine",
    "load": "refllama.engine",
    "BackendError": "refllama.errors",
    "CheckpointError": "refllama.errors",
    "ConfigError": "refllama.errors",
    "InputError": "refllama.errors",
    "RefLlamaError": "refllama.errors",
    "TokenizerError": "refllama.errors",
    "WeightError": "refllama.errors",
    "LlamaTokenizer": "refllama.formats.tokenizer",
    "TokenizerType": "refllama.formats.tokenizer",
    "load_tokenizer": "refllama.formats.tokenizer",
    "GenerationRequest": "refllama.generation",
    "GenerationResponse": "refllama.generation",
    "TokenLogprob": "refllama.generation",
    "KVCache": "refllama.model.kv_cache",
}

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


def __getattr__(name: str) -> object:
    """Import a public name's module on first access and keep the name here, so the next access is a plain lookup."""
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
