"""refllama: a reference inference engine for Llama-family models, written once in NumPy."""

from refllama.config import ActivationType, LlamaConfig, RopeScaling
from refllama.dtypes import DataType, LayerDataTypeConfig
from refllama.engine import GenericLlamaEngine, load
from refllama.errors import BackendError, CheckpointError, ConfigError, InputError, RefLlamaError, WeightError
from refllama.kv_cache import KVCache

__version__ = "0.1.0"

__all__ = [
    "ActivationType", "BackendError", "CheckpointError", "ConfigError", "DataType", "GenericLlamaEngine",
    "InputError", "KVCache", "LayerDataTypeConfig", "LlamaConfig", "RefLlamaError", "RopeScaling", "WeightError",
    "load",
]
