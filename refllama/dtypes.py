"""The spec's DataType and per-layer data type configuration, and their NumPy dtypes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np


class DataType(enum.Enum):
    """Data types of weights and computation (the spec's DataType), plus F64 for the oracle mode."""

    F64 = "float64"
    F32 = "float32"
    F16 = "float16"
    BF16 = "bfloat16"
    I8 = "int8"
    I4 = "int4"
    U8 = "uint8"
    U4 = "uint4"
    W8A8 = "w8a8"
    W4A16 = "w4a16"
    W8A16 = "w8a16"
    CompressedTensors = "compressed-tensors"
    Custom = "custom"

    @classmethod
    def parse(cls, value: str | DataType) -> DataType:
        """Accept a DataType, its name ("F32") or value ("float32"), or a torch-style name ("torch.bfloat16")."""
        if isinstance(value, DataType):
            return value
        text = str(value).strip().removeprefix("torch.")
        text = _ALIASES.get(text.lower(), text)
        for member in cls:
            if text in (member.name, member.value):
                return member
        raise ValueError(f"unknown data type {value!r}")

    @property
    def is_float(self) -> bool:
        return self in (DataType.F64, DataType.F32, DataType.F16, DataType.BF16)

    @property
    def numpy_dtype(self) -> np.dtype:
        """The NumPy dtype of a plain (unquantized) type; quantized types have none."""
        try:
            return np.dtype(_NUMPY[self])
        except KeyError:
            raise ValueError(f"{self.name} is not a plain array dtype") from None


_ALIASES = {"float": "float32", "half": "float16", "double": "float64", "fp32": "float32", "fp16": "float16",
            "bf16": "bfloat16", "f32": "float32", "f16": "float16", "f64": "float64"}
_NUMPY = {DataType.F64: np.float64, DataType.F32: np.float32, DataType.F16: np.float16,
          DataType.BF16: ml_dtypes.bfloat16, DataType.I8: np.int8, DataType.U8: np.uint8,
          DataType.I4: ml_dtypes.int4, DataType.U4: ml_dtypes.uint4}


class AttentionComponent(enum.Enum):
    QueryProjection = "q_proj"
    KeyProjection = "k_proj"
    ValueProjection = "v_proj"
    OutputProjection = "o_proj"
    RotaryEmbedding = "rotary_emb"


class MLPComponent(enum.Enum):
    GateProjection = "gate_proj"
    UpProjection = "up_proj"
    DownProjection = "down_proj"


@dataclass(frozen=True)
class LayerDataTypeConfig:
    """Per-component data types (the spec's LayerDataTypeConfig); refllama/quant/quantize.py applies them."""

    embedding: DataType = DataType.F32
    attention_weights: dict[AttentionComponent, DataType] = field(default_factory=dict)
    mlp_weights: dict[MLPComponent, DataType] = field(default_factory=dict)
    layer_norm: DataType = DataType.F32
    activations: DataType = DataType.F32
