"""Quantization: configs, quantized weight types, their reference arithmetic, loading and quantizing at load.

* config.py: QuantizationConfig from an HF `quantization_config` block or quantize_config.json;
* types.py: Int8Weight / PackedIntWeight (what a quantized Linear's weight is) and `dequantize`;
* packing.py: int32 bit packing (compressed-tensors, GPTQ, AWQ);
* int8.py: W8A8 per-token activation quantization ("hf" and "vllm") and exact int32 accumulation;
* loader.py: checkpoint tensors -> weight objects;
* quantize.py: compressed-tensors' formulas on float weights, per-layer data types, precision switching.
"""

from refllama.quant.config import (
    QuantizationConfig,
    QuantizationGroup,
    QuantizationMethod,
    QuantizationSpec,
    parse_quantization_config,
    read_quantize_config,
)
from refllama.quant.types import (
    ActivationQuant,
    Int8Weight,
    PackedIntWeight,
    QuantizedWeight,
    dequantize,
    is_quantized,
)

__all__ = ["ActivationQuant", "Int8Weight", "PackedIntWeight", "QuantizationConfig", "QuantizationGroup",
           "QuantizationMethod", "QuantizationSpec", "QuantizedWeight", "dequantize", "is_quantized",
           "parse_quantization_config", "read_quantize_config"]
