"""Chat templates: render `tokenizer_config.json`'s (or GGUF's) Jinja chat template exactly as transformers does.

Templates come from model files, so they run in Jinja's immutable sandbox, with transformers' environment
(trim_blocks, lstrip_blocks, loop controls) and globals (`raise_exception`, `strftime_now`, a `tojson` that does
not escape HTML), and with `bos_token`, `eos_token`, `add_generation_prompt` and `tools` passed in. The rendered
text already contains the template's special tokens: tokenize it without adding BOS again.

The sandbox stops a template from reaching Python, not from working forever or filling memory (nested loops of
10^5 steps each, `"x" * 10**10`, a string doubled in a loop). So every render also runs under a budget
(`TIME_LIMIT` seconds, and an output of at most `MAX_OUTPUT_CHARS` plus a multiple of the input's size), checked on
every call, loop step, output expression and string operation: a template over it raises InputError saying which
limit it hit. Every loop's iterable is wrapped (an edit of the parsed template) so that each step is counted along
with the literal text its body writes.
"""

from __future__ import annotations

import contextvars
import json
import re
import time
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from refllama.errors import InputError
from refllama.generation.requests import Message

TIME_LIMIT = 2.0  # seconds per render; real templates take well under 10 ms
MAX_OUTPUT_CHARS = 1 << 20  # characters a render may produce besides INPUT_FACTOR x the size of its inputs
INPUT_FACTOR = 4
MAX_TEMPLATE_CHARS = 1 << 20  # published templates are at most ~20 KB
MAX_POWER = 10_000  # the largest exponent `**` may take (10 ** 10 ** 10 would run for ever)
_LOOP_GUARD = "refllama_loop_guard"



def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    if isinstance(indent, int) and indent > 100:
        raise _OverBudget(f"asks tojson for an indent of {indent} (at most 100)")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Budget:
    """What one render may still spend: a deadline and a number of characters."""

    def __init__(self, chars: int):
        self.deadline = time.monotonic() + TIME_LIMIT
        self.chars = chars

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _OverBudget(f"took longer than {TIME_LIMIT} s")

    def spend(self, n: int) -> None:
        self.chars -= n
        if self.chars < 0:
            raise _OverBudget("produced more text than its limit")
        self.tick()


class _OverBudget(Exception):
    pass


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("chat_template_budget")


def _size(x: Any) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else 0


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, charging every call, operator and output to the current render's budget."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call(__self, __context, __obj, *args, **kwargs):
        _BUDGET.get().tick()
        receiver = getattr(__obj, "__self__", None)
        if isinstance(receiver, str):  # "x".ljust(10**10) and the like: charged before they run
            _charge(getattr(__obj, "__name__", ""), receiver, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        """str.format / format_map, which the sandbox wraps at attribute access, charged before they run."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        receiver = value.__self__

        def run(*args: Any, **kwargs: Any) -> str:
            _charge("format", receiver, args, kwargs)
            return wrapped(*args, **kwargs)

        return run

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        budget = _BUDGET.get()
        if op == "*" and isinstance(right, int) and _size(left):
            budget.spend(_size(left) * max(right, 0))
        elif op == "*" and isinstance(left, int) and _size(right):
            budget.spend(_size(right) * max(left, 0))
        elif op == "+":
            budget.spend(_size(left) + _size(right))
        elif op == "**" and isinstance(right, (int, float)) and abs(right) > MAX_POWER:
            raise _OverBudget(f"raises to a power above {MAX_POWER}")
        return super().call_binop(context, op, left, right)


class _Namespace(Namespace):
    """jinja's namespace(), charging what is stored in it (a string doubled in a loop grows exponentially)."""

    def __setitem__(self, name: str, value: Any) -> None:
        _BUDGET.get().spend(_size(value))
        super().__setitem__(name, value)


# Functions whose output can be far larger than their input, by what sizes them (filters and str methods alike).
_WIDTH = {"center", "ljust", "rjust", "zfill", "truncate", "wordwrap"}  # output ~ input + an integer argument
_AMPLIFIERS = _WIDTH | {"indent", "expandtabs", "replace", "join", "format", "format_map"}


def _charge(name: str, value: Any, args: tuple, kwargs: dict) -> None:
    """Charge the budget what `value.name(*args, **kwargs)` (or `value|name(...)`) could produce, before it runs."""
    if name not in _AMPLIFIERS:
        return
    numbers = [a for a in (*args, *kwargs.values()) if isinstance(a, int) and not isinstance(a, bool)]
    texts = [a for a in (*args, *kwargs.values()) if isinstance(a, str)]
    size = len(value) if isinstance(value, str) else 0
    biggest = max([0, *numbers])
    if name in _WIDTH:
        cost = size + biggest
    elif name == "indent":  # each line gets the indent (an int, or a string)
        width = max(biggest, *(len(t) for t in texts), 0)
        cost = size + width * (value.count("\n") + 1 if isinstance(value, str) else 1)
    elif name == "expandtabs":
        cost = size + (value.count("\t") if isinstance(value, str) else 0) * max(biggest, 8)
    elif name == "replace" and isinstance(value, str) and len(texts) >= 2:
        hits = value.count(texts[0]) if texts[0] else size + 1
        cost = size + hits * len(texts[1])
    elif name == "join":
        n = len(value) if hasattr(value, "__len__") else 0
        cost = n * max([1, *(len(t) for t in texts)])
    else:  # format: a width or precision written in the format string itself
        cost = size + max([0, *(int(d) for d in re.findall(r"\d{1,30}", value if isinstance(value, str) else ""))])
    _BUDGET.get().spend(cost)


def _guarded_filter(name: str, fn: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        budget.tick()
        # filters get (value, *args), or (environment/context, value, *args) when they take one
        value_at = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0
        _charge(name, args[value_at] if len(args) > value_at else None, args[value_at + 1:], kwargs)
        return fn(*args, **kwargs)

    for attr in ("jinja_pass_arg",):
        if hasattr(fn, attr):
            setattr(run, attr, getattr(fn, attr))
    return run


def _finalize(value: Any) -> Any:
    """Every `{{ ... }}` output, inside macros too, is charged here."""
    _BUDGET.get().spend(_size(value) if isinstance(value, str) else len(str(value)))
    return value


def _loop_guard(iterable: Any, literal_chars: int) -> Any:
    """Each loop step costs a tick and the literal text of the loop's body."""
    budget = _BUDGET.get()
    for item in iterable:
        budget.spend(literal_chars)
        yield item


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
                           finalize=_finalize)
    env.filters["tojson"] = _tojson
    for name in _AMPLIFIERS & set(env.filters):
        env.filters[name] = _guarded_filter(name, env.filters[name])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals[_LOOP_GUARD] = _loop_guard
    tree = env.parse(template)
    for loop in tree.find_all(nodes.For):
        literal = sum(len(d.data) for n in loop.body for d in n.find_all(nodes.TemplateData)) + \
            sum(len(n.data) for n in loop.body if isinstance(n, nodes.TemplateData))
        loop.iter = nodes.Call(nodes.Name(_LOOP_GUARD, "load"), [loop.iter, nodes.Const(max(literal, 1))], [],
                               None, None)
    return env.from_string(tree)


def render_chat_template(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                         tools: Sequence[dict] | None = None, bos_token: str | None = None,
                         eos_token: str | None = None, **extra: Any) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]), rendered under the budget."""
    if not isinstance(messages, Sequence) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise InputError("messages must be a list of {'role': ..., 'content': ...} objects")
    if not isinstance(template, str) or len(template) > MAX_TEMPLATE_CHARS:
        raise InputError(f"the chat template is not a string of at most {MAX_TEMPLATE_CHARS} characters")
    try:
        inputs = len(json.dumps([list(messages), tools, extra], default=str))
    except (TypeError, ValueError, RecursionError):
        raise InputError("messages, tools and extra arguments must be JSON-like data") from None
    token = _BUDGET.set(_Budget(MAX_OUTPUT_CHARS + INPUT_FACTOR * inputs))
    try:
        rendered = _compile(template).generate(
            messages=list(messages), tools=tools, bos_token=bos_token or "", eos_token=eos_token or "",
            add_generation_prompt=add_generation_prompt, **extra)
        return "".join(rendered)
    except _OverBudget as e:
        raise InputError(f"chat template {e} (limits: {TIME_LIMIT} s, {MAX_OUTPUT_CHARS} characters plus "
                         f"{INPUT_FACTOR}x the input): refused") from None
    except jinja2.exceptions.SecurityError as e:
        raise InputError(f"chat template tried something the sandbox forbids: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise InputError(f"chat template error: {e}") from None
    except (RecursionError, MemoryError, OverflowError) as e:
        raise InputError(f"chat template failed: {type(e).__name__} (runaway recursion or size)") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError) as e:
        raise InputError(f"chat template failed on its data: {type(e).__name__}: {e}"[:300]) from None
    finally:
        _BUDGET.reset(token)
