"""`refllama serve`: an OpenAI-compatible HTTP server whose logprobs are the reference (docs/serve.md).

`app.py` holds the routes, `schema.py` the request bodies and the error shape, `scheduler.py` the engine thread
that batches requests arriving together. Needs the `serve` extra (Starlette, uvicorn, pydantic).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refllama.serve.app import Limits, create_app

__all__ = ["Limits", "create_app", "model_id", "run"]


def model_id(path: str | Path) -> str:
    """The name /v1/models reports: the model folder's name, or the GGUF file's without its suffix."""
    p = Path(path)
    return p.stem if p.suffix == ".gguf" else p.name


def run(engine: Any, name: str, host: str = "127.0.0.1", port: int = 8080, *, log_level: str = "info",
        **options: Any) -> None:
    """Serve `engine` until interrupted. `options`: create_app's limits, api_key, max_batch_size, padded_batches."""
    import uvicorn

    uvicorn.run(create_app(engine, name, **options), host=host, port=port, log_level=log_level)
