"""Chat templates: render `tokenizer_config.json`'s (or GGUF's) Jinja chat template exactly as transformers does.

Templates come from model files, so they run in Jinja's immutable sandbox, with transformers' environment
(trim_blocks, lstrip_blocks, loop controls) and globals (`raise_exception`, `strftime_now`, a `tojson` that does
not escape HTML), and with `bos_token`, `eos_token`, `add_generation_prompt` and `tools` passed in. The rendered
text already contains the template's special tokens: tokenize it without adding BOS again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from refllama.errors import InputError

if TYPE_CHECKING:  # at run time jinja2 is imported by the functions below: plain prompts never need it
    import jinja2

Message = dict[str, Any]


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                         tools: Sequence[dict] | None = None, bos_token: str | None = None,
                         eos_token: str | None = None, **extra: Any) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
    import jinja2

    if not isinstance(messages, Sequence) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise InputError("messages must be a list of {'role': ..., 'content': ...} objects")
    try:
        return _compile(template).render(messages=list(messages), tools=tools, bos_token=bos_token or "",
                                         eos_token=eos_token or "", add_generation_prompt=add_generation_prompt,
                                         **extra)
    except jinja2.exceptions.SecurityError as e:
        raise InputError(f"chat template tried something the sandbox forbids: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise InputError(f"chat template error: {e}") from None
