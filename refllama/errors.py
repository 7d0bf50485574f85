"""Typed errors. Every error refllama raises for bad input is a RefLlamaError that names what is at fault."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RefLlamaError(Exception):
    """Base class of every error refllama raises on purpose."""


class ConfigError(RefLlamaError):
    """A config.json / generation_config.json field is missing, malformed or unsupported."""

    def __init__(self, field: str, message: str, path: str | Path | None = None):
        self.field = field
        self.message = message
        self.path = str(path) if path is not None else None
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}config field '{field}': {message}")


class CheckpointError(RefLlamaError):
    """A checkpoint file is missing, unreadable or malformed."""

    def __init__(self, message: str, path: str | Path | None = None, tensor: str | None = None):
        self.path = str(path) if path is not None else None
        self.tensor = tensor
        parts = [p for p in (self.path, f"tensor '{tensor}'" if tensor else None) if p]
        super().__init__(f"{': '.join(parts)}: {message}" if parts else message)


class WeightError(CheckpointError):
    """The tensors of a checkpoint do not match what the config says the model needs."""


class TokenizerError(CheckpointError):
    """A tokenizer file or vocabulary is missing, malformed or unsupported."""


class BackendError(RefLlamaError):
    """A backend is unknown, not installed, or cannot run the requested dtype."""


class InputError(RefLlamaError):
    """Token ids or other call arguments are invalid (out of vocabulary, empty, over the cache size)."""


class StageError(RefLlamaError):
    """A pipeline stage died, failed or did not answer within its timeout (refllama/sharding); the sharded engine
    cannot go on: close it and load it again."""

    def __init__(self, stage: int, layers: range, message: str):
        self.stage, self.layers = stage, layers
        where = f"layers {layers.start}-{layers.stop - 1}" if len(layers) > 1 else f"layer {layers.start}"
        super().__init__(f"pipeline stage {stage} ({where}): {message}")


class NumericalError(RefLlamaError):
    """Weights or activations are NaN or infinite: the model would compute nonsense, so it does not compute."""


def brief(value: Any, limit: int = 60) -> str:
    """A short repr of a value read from a file, for error messages: they name a bad value, never quote a file."""
    if isinstance(value, (str, bytes)):
        text = repr(value[:limit])
        return text if len(value) <= limit else f"{text}... ({len(value)} in all)"
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} items"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} ({value.dtype})"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
