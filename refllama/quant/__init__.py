"""Quantization: configuration now; quantized weight types come with the quantization issue."""

from refllama.quant.config import (
    QuantizationConfig,
    QuantizationGroup,
    QuantizationMethod,
    QuantizationSpec,
    parse_quantization_config,
)

__all__ = ["QuantizationConfig", "QuantizationGroup", "QuantizationMethod", "QuantizationSpec",
           "parse_quantization_config"]
