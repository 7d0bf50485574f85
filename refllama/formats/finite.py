"""Finiteness: NaN or infinite weights are refused at load, and NaN/Inf activations are traced to their first layer.

One NaN weight turns every logit NaN, and argmax over NaN silently returns token 0: a model with such a weight
would generate garbage without a word. So every float tensor a model reads is checked once at load (float arrays,
quantization scales, the scales inside GGUF blocks; integer codes cannot be non-finite), and a NumericalError names
the first bad one. The check is a chunked sum: NaN and Inf propagate through a sum, so a finite sum proves the chunk
finite, and only a chunk whose sum is not finite is scanned element by element (a sum can also overflow). Chunks stay
in cache, so the cost is one read of the weights (measured in docs/security.md).

Activations can still overflow (half precision, extreme inputs). `first_nonfinite` finds, in a forward-pass trace,
the first intermediate that holds a NaN or Inf: what generation reports when logits stop being finite.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np

from refllama.dtypes import is_ml_float
from refllama.errors import NumericalError
from refllama.formats import ggml_quants
from refllama.formats.files import FileMap
from refllama.formats.safetensors import mapped_base, release_pages
from refllama.model.weights import WeightMap
from refllama.quant.gguf_blocks import GGUFBlockWeight

_CHUNK = 1 << 18  # elements per chunk: 1 MiB of float32, well inside L2

# WeightMap field paths -> Hugging Face tensor names, for messages
_HF_PREFIXES = (("embeddings", "model.embed_tokens.weight"), ("final_norm", "model.norm.weight"),
                ("lm_head", "lm_head.weight"))


def check_weights(weights: WeightMap, source: Any = None) -> None:
    """NumericalError naming the first weight tensor (in `source`, a path) that holds a NaN or an Inf. A checked
    tensor's mapped pages are let go (`release_pages`): the check reads every page of a GGUF's blocks, and a
    backend that copies its weights at load would otherwise hold the file and the copy at once."""
    for name, array, stored in _float_tensors(weights):
        if not is_finite(array):
            count = _count_nonfinite(array)
            where = f"{source}: " if source is not None else ""
            raise NumericalError(f"{where}weight {name} holds {count} NaN or infinite values: the model would "
                                 "compute NaN (load with verify=False to skip this check)")
        if stored is not None:
            release_pages(stored)


def is_finite(array: np.ndarray) -> bool:
    """True when every element of a host float array is finite. A contiguous view of a mapped file is read from
    the file (FileMap.chunks), not through the map, so checking a model does not make it resident."""
    array = np.asarray(array)
    mapped = _file_map(array)
    if mapped is not None:
        fmap, offset = mapped
        chunks = (np.frombuffer(piece, array.dtype) for piece in fmap.chunks(offset, array.nbytes,
                                                                              _CHUNK * array.itemsize))
    else:
        flat = array.reshape(-1)
        chunks = (flat[start:start + _CHUNK] for start in range(0, flat.size, _CHUNK))
    return all(_finite_chunk(chunk) for chunk in chunks)


def _finite_chunk(chunk: np.ndarray) -> bool:
    if is_ml_float(chunk.dtype):
        chunk = chunk.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow or NaN in the sum is what is looked for
        total = chunk.sum(dtype=np.float64 if chunk.dtype == np.float64 else np.float32)
    return bool(np.isfinite(total) or np.isfinite(chunk).all())  # a finite sum proves the chunk finite


def _file_map(array: np.ndarray) -> tuple[FileMap, int] | None:
    """(the FileMap an array views, the array's offset in it) for a C-contiguous view of one, else None."""
    base = mapped_base(array)
    if base is None or not array.flags.c_contiguous or array.size == 0 or array.dtype.itemsize == 0 or \
            array.dtype.hasobject:
        return None
    return base, array.ctypes.data - np.frombuffer(base, np.uint8).ctypes.data


def first_nonfinite(trace: Mapping[str, Any]) -> str | None:
    """The name of the first intermediate (in forward order) holding a NaN or an Inf, or None."""
    for name, value in trace.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" or is_ml_float(value.dtype):
            if not np.isfinite(value.astype(np.float32, copy=False)).all():
                return name
    return None


def _count_nonfinite(array: np.ndarray) -> int:
    flat = np.asarray(array).reshape(-1)
    return sum(int(np.count_nonzero(~np.isfinite(flat[i:i + _CHUNK].astype(np.float32))))
               for i in range(0, flat.size, _CHUNK))


def _float_tensors(weights: WeightMap) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """(name, host float array, the stored array to let go once it is checked) for every float tensor the model
    reads, scales inside GGUF blocks included: the blocks come with their last float field only (Q4_1's d and m
    read the same pages), so they are read once."""
    for path, node in _walk(weights, ""):
        if isinstance(node, GGUFBlockWeight):
            layout = ggml_quants.block_layout(node.ggml_type)
            if layout is not None:
                blocks = np.ascontiguousarray(node.raw).reshape(-1).view(layout)
                fields = [field for field in layout.names if layout[field].kind == "f"]
                for field in fields:
                    yield (f"{_hf_name(path)} (block field {field})", blocks[field],
                           node.raw if field == fields[-1] else None)
        elif isinstance(node, np.ndarray) and (node.dtype.kind == "f" or is_ml_float(node.dtype)):
            yield _hf_name(path), node, node


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk(item, f"{path}.{i}")
    elif isinstance(node, GGUFBlockWeight):
        yield path, node
    elif is_dataclass(node):
        for f in fields(node):
            yield from _walk(getattr(node, f.name), f"{path}.{f.name}" if path else f.name)
    elif node is not None:
        yield path, node


def _hf_name(path: str) -> str:
    """A WeightMap path as the checkpoint names it: layers.3.self_attention.q_proj.weight ->
    model.layers.3.self_attn.q_proj.weight (sub-fields of quantized weights are kept: ....weight.scale)."""
    for field, name in _HF_PREFIXES:
        if path == field or path.startswith(field + "."):
            return name + path[len(field):]
    if path.startswith("layers."):
        path = "model." + path.replace(".self_attention.", ".self_attn.")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if path.endswith("." + norm):
                return path + ".weight"
    return path
