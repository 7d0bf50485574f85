"""The spec's DataType and per-layer data type configuration, and their NumPy dtypes."""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field

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
        """The NumPy dtype of a plain (unquantized) type; quantized types have none. ml_dtypes (bfloat16, int4) is
        imported here, when first asked for: its import takes longer than all of `import refllama`."""
        if self in _NUMPY:
            return np.dtype(_NUMPY[self])
        if self in _ML_DTYPES:
            import ml_dtypes

            return np.dtype(getattr(ml_dtypes, _ML_DTYPES[self]))
        raise ValueError(f"{self.name} is not a plain array dtype")


_ALIASES = {"float": "float32", "half": "float16", "double": "float64", "fp32": "float32", "fp16": "float16",
            "bf16": "bfloat16", "f32": "float32", "f16": "float16", "f64": "float64"}
_NUMPY = {DataType.F64: np.float64, DataType.F32: np.float32, DataType.F16: np.float16, DataType.I8: np.int8,
          DataType.U8: np.uint8}
_ML_DTYPES = {DataType.BF16: "bfloat16", DataType.I4: "int4", DataType.U4: "uint4"}  # names in ml_dtypes


def is_ml_float(dtype: np.dtype) -> bool:
    """Whether `dtype` is one of ml_dtypes' floats (bfloat16, float8), which np.floating does not include. Only an
    imported ml_dtypes makes such arrays, so this looks it up in sys.modules instead of importing it."""
    ml_dtypes = sys.modules.get("ml_dtypes")
    return ml_dtypes is not None and dtype.type in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)


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
