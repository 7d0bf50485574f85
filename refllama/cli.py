"""The `refllama` command: generate, chat, logits, inspect, compare, trace, bench, convert, serve.

MODEL is a Hugging Face folder or a .gguf file; omitted, it is the embedded default (SmolLM2-135M-Instruct).
Exit codes: 0 ok, 2 usage, 1 model or input error (one line on stderr; the traceback only with --debug).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from refllama import __version__
from refllama.errors import InputError, RefLlamaError

# The CLI's generation defaults are GenerationRequest's (tests/test_cli.py checks that they agree).
MAX_NEW_TOKENS = 64
CHAT_BANNER = "Chat with {name}. /reset clears the history, /exit (or Ctrl-D) leaves, Ctrl-C stops an answer."


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, [], argparse.SUPPRESS) or action.help is None:
            return action.help
        return super()._get_help_string(action)

# Command implementations (and numpy) are imported inside the commands, so `refllama --help` stays fast.


def _add_model_options(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("model", nargs="?", default=None, help="HF folder or .gguf file (default: embedded SmolLM2)")
    _add_backend_options(p)
    p.add_argument("--quant-semantics", choices=("hf", "vllm"), default="hf",
                   help="W8A8 activation quantization: compressed-tensors/HF or vLLM")
    p.add_argument("--dequantize", action="store_true", help="dequantize weight-only quantized weights at load")
    p.add_argument("--lm-head-dtype", choices=("int8",), default=None,
                   help="quantize a float lm_head at load: int8 = per-channel int8 with per-token int8 inputs (W8A8)")
    p.add_argument("--shards", type=_shards, default=None,
                   help="split the layers into N pipeline stages, or at split points 0,10,20,32 (docs/sharding.md)")
    p.add_argument("--cluster", choices=("ray",), default=None,
                   help="run each stage in a Ray actor (RAY_ADDRESS, else a local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress or speed report on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="numpy", help="array backend: numpy, numba, mlx, cupy")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32, float64, float16, bfloat16")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability mass")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' repetition penalty")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler: same seed, same text")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _shards(text: str) -> int | list[int] | str:
    """--shards: a stage count, comma-separated split points, or (for inspect) "auto"."""
    if text == "auto":
        return text
    try:
        points = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of stages, split points like 0,10,20,32 or auto, "
                                         f"not {text!r}") from None
    return points[0] if len(points) == 1 else points


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refllama", description=__doc__.split("\n\n")[0], formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"refllama {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_Help)

    g = command("generate", "continue a prompt: refllama generate [MODEL] PROMPT")
    g.add_argument("positional", nargs="*", metavar="[MODEL] PROMPT",
                   help="a model (HF folder or .gguf file; default: embedded SmolLM2) and the prompt")
    _add_model_options(g, model=False)
    g.add_argument("-p", "--prompt", default=None, help="the prompt (instead of the positional PROMPT)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    _add_sampling_options(g)
    g.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="each token's logprob and its top N alternatives (needs --json)")
    g.set_defaults(finish=lambda args: _generate_arguments(g, args))
    out = g.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print text as it is generated")
    out.add_argument("--json", action="store_true", help="print the whole response as JSON")

    c = command("chat", "interactive chat (/reset clears the history, /exit leaves)")
    _add_model_options(c)
    c.add_argument("--system", default=None, help="a system message")
    _add_sampling_options(c)

    lg = command("logits", "write the logits of every position to a .npy file")
    _add_model_options(lg)
    src = lg.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text, tokenized by the model's tokenizer")
    src.add_argument("--ids", help="comma-separated token ids")
    lg.add_argument("--out", required=True, type=Path, help="the .npy file to write (.npy is added if missing)")

    ins = command("inspect", "diagnose a model from its headers: variant, weights, memory, backends")
    ins.add_argument("model", nargs="?", default=None, help="HF folder or .gguf file (default: embedded SmolLM2)")
    ins.add_argument("--json", action="store_true", help="print the report as JSON (schema: docs/inspect.md)")
    _add_backend_options(ins)
    ins.add_argument("--context", type=int, default=None, help="context length (default: the model's maximum)")
    ins.add_argument("--batch", type=int, default=1, help="batch size of the memory estimate")
    ins.add_argument("--memory-limit", default=None, help="with a unit: 16GB, 512MB, 8GiB (per stage with --shards)")
    ins.add_argument("--shards", type=_shards, default=None,
                     help="plan pipeline stages: N, split points 0,10,20,32, or auto (the fewest that fit the limit)")
    ins.add_argument("--verify", action="store_true", help="also read every tensor: NaN/Inf scan, checksums")
    ins.add_argument("--debug", action="store_true", help="show tracebacks")

    cmp = command("compare", "trace two models (or backends, or dtypes) and show where they diverge")
    cmp.epilog = ("exit codes: 0 every tensor within the profile, 1 a tensor diverges, 2 usage error or an unreadable "
                  "model or trace (docs/trace-format.md)")
    cmp.add_argument("a", help="reference: a model folder, a .gguf file, or a trace .npz (refllama trace)")
    cmp.add_argument("b", nargs="?", default=None, help="candidate (default: A again, with --backend-b/--dtype-b)")
    src = cmp.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", help="comma-separated token ids")
    src.add_argument("--text", help="text, tokenized by A's tokenizer")
    for side, dtype in (("a", "float64"), ("b", "float32")):
        cmp.add_argument(f"--backend-{side}", default="numpy", help=f"backend of {side.upper()}")
        cmp.add_argument(f"--dtype-{side}", default=dtype, help=f"compute dtype of {side.upper()}")
    cmp.add_argument("--profile", default="f32", help="tolerance profile: f64, f32, bf16, int8, q4")
    cmp.add_argument("--decode-from", type=int, default=None,
                     help="trace model sides through the KV cache: a prefill of N ids, then one id per step")
    cmp.add_argument("--json", action="store_true", help="print the rows as JSON")
    cmp.add_argument("--plot", type=Path, default=None, help="write a per-layer error plot (PNG; needs matplotlib)")
    cmp.add_argument("--debug", action="store_true", help="show tracebacks")

    tr = command("trace", "write every intermediate of one forward pass as a trace .npz")
    tr.description = ("Trace a model with refllama or another engine, under refllama's names (docs/trace-format.md); "
                      "`refllama compare` reads the file.")
    tr.add_argument("model", help="HF folder or .gguf file")
    tr.add_argument("--engine", default="refllama", choices=("refllama", "hf", "llamacpp", "mlx-lm"),
                    help="refllama, hf (transformers), llamacpp (llama-cpp-python; a .gguf) or mlx-lm")
    tr.add_argument("--ids", required=True, help="comma-separated token ids")
    tr.add_argument("--out", required=True, type=Path)
    tr.add_argument("--backend", default="numpy", help="refllama's backend (--engine refllama)")
    tr.add_argument("--dtype", default="float32", help="compute dtype (llama.cpp: as the file stores it)")
    tr.add_argument("--decode-from", type=int, default=None, help="refllama: prefill N ids, then one per step")
    tr.add_argument("--kv-cache", default="f16", choices=("f16", "f32"), help="llamacpp: the KV cache's type")
    tr.add_argument("--flash-attention", default="auto", choices=("auto", "on", "off"),
                    help="llamacpp: flash attention (llama.cpp's CPU kernel rounds to f16; auto turns it on)")
    tr.add_argument("--debug", action="store_true", help="show tracebacks")

    bn = command("bench", "prefill and decode tokens/s, time to first token and peak RSS of a model")
    _add_model_options(bn)
    bn.add_argument("--prompt-tokens", type=int, default=128, help="prompt length")
    bn.add_argument("--new-tokens", type=int, default=128, help="tokens to decode")
    bn.add_argument("--reps", type=int, default=3, help="timed repetitions; figures are their medians")
    bn.add_argument("--profile", action="store_true", help="also show where one decode step spends its time")
    bn.add_argument("--json", action="store_true", help="print the figures as JSON")

    cv = command("convert", "write a GGUF model as a Hugging Face folder")
    cv.add_argument("gguf", type=Path, help="the .gguf file")
    cv.add_argument("out_dir", type=Path, help="the folder to write (created)")
    cv.add_argument("--debug", action="store_true", help="show tracebacks")
    _add_serve_parser(sub)
    return parser


def _generate_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`generate [MODEL] PROMPT` or `generate [MODEL] -p PROMPT` -> args.model, args.prompt; usage errors exit 2.
    One positional without -p is the prompt unless it names a model (a folder or a .gguf file)."""
    given = list(args.positional)
    if args.logprobs is not None and not args.json:
        parser.error("--logprobs needs --json (the alternatives are part of the JSON response)")
    if args.prompt is not None:
        if len(given) > 1:
            parser.error(f"the prompt is given twice: -p and {given[1]!r}")
        args.model = given[0] if given else None
        return
    if len(given) == 2:
        args.model, args.prompt = given
    elif len(given) == 1 and not _names_a_model(given[0]):
        args.model, args.prompt = None, given[0]
    elif len(given) > 2:
        parser.error("generate takes [MODEL] PROMPT; quote a prompt that has spaces")
    else:
        parser.error("no prompt: refllama generate [MODEL] 'the prompt' (or -p 'the prompt')")


def _names_a_model(text: str) -> bool:
    return text.endswith(".gguf") or Path(text).expanduser().is_dir()


@contextmanager
def _spinner(args: argparse.Namespace, message: str) -> Iterator[Callable[[], None]]:
    """A transient spinner with `message` on a terminal's stderr (not with --quiet); yields a function that stops
    it early (when output starts)."""
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.console import Console
    from rich.live import Live
    from rich.spinner import Spinner

    live = Live(Spinner("dots", text=message), console=Console(stderr=True), transient=True, refresh_per_second=8)
    live.start(refresh=True)  # drawn now, before the work it describes
    progress = sys.modules.get("refllama.backends.numba_progress")  # loaded with the numba backend
    previous = progress.set_reporter(lambda done, name: live.update(Spinner(
        "dots", text=f"{message} [{progress.MESSAGE}: {done} done, now {name}]"))) if progress else None
    try:
        yield live.stop
    finally:
        live.stop()
        if progress:
            progress.set_reporter(previous)


def _load(args: argparse.Namespace):
    from refllama.engine import load
    from refllama.formats.default_model import default_model_path

    if args.shards == "auto":
        raise InputError("--shards auto plans stages against a memory limit: use it with inspect --memory-limit")
    sharded = args.shards is not None or args.cluster is not None
    options = {"shards": args.shards, "cluster": args.cluster} if sharded else {}
    name = Path(args.model).name if args.model else default_model_path().name
    if args.lm_head_dtype is not None:
        options["lm_head_dtype"] = args.lm_head_dtype
    with _spinner(args, f"loading {name} on {args.backend} {args.dtype}"):
        engine = load(args.model, backend=args.backend, dtype=args.dtype, dequantize=args.dequantize,
                      quant_semantics=args.quant_semantics, **options)
    if args.lm_head_dtype is not None and not args.quiet:
        print(f"[{engine.describe()}]", file=sys.stderr)  # a changed head is stated, never silent
    return engine


def _first_run_note(engine, doing: str = "generating") -> str:
    """What the spinner says while the model runs: numba compiles its kernels on a first run."""
    if getattr(engine.backend, "name", None) == "numba":  # a sharded engine's backends live in its stages
        from refllama.backends.numba_kernels import cache_dir

        folder = Path(cache_dir())
        if not folder.is_dir() or not any(folder.rglob("*.nbi")):
            return f"{doing} (numba compiles its kernels on this first run, about 10 s; later runs reuse them)"
    return doing


def _request(args: argparse.Namespace, **source):
    from refllama.generation import GenerationRequest

    return GenerationRequest(**source, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                             repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                             logprobs=getattr(args, "logprobs", None))


def _speed(response, quiet: bool) -> None:
    if not quiet:
        t = response.timings
        print(f"[prefill {t.prefill_tokens} tokens at {t.prefill_tokens_per_second:.1f} tok/s, "
              f"decode {t.decode_tokens} tokens at {t.decode_tokens_per_second:.1f} tok/s]", file=sys.stderr)


def _stream(engine, request, args: argparse.Namespace, write: Callable[[str], Any]):
    """Write the response as it arrives (a spinner until the first piece); returns the GenerationResponse."""
    pieces = engine.stream(request)
    with _spinner(args, _first_run_note(engine)) as stop:
        while True:
            try:
                piece = next(pieces)
            except StopIteration as done:
                return done.value
            stop()
            write(piece)


def cmd_generate(args: argparse.Namespace) -> None:
    engine = _load(args)
    source = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
    request = _request(args, **source)
    if args.stream:
        response = _stream(engine, request, args, lambda piece: print(piece, end="", flush=True))
        print()
        _speed(response, args.quiet)
        return
    with _spinner(args, _first_run_note(engine)):
        response = engine.generate(request)
    if args.json:
        out = asdict(response)
        out["usage"]["total_tokens"] = response.usage.total_tokens
        out["timings"]["prefill_tokens_per_second"] = response.timings.prefill_tokens_per_second
        out["timings"]["decode_tokens_per_second"] = response.timings.decode_tokens_per_second
        print(json.dumps(out, ensure_ascii=False))
        return
    print(response.text)
    _speed(response, args.quiet)


def _line_reader() -> Callable[[], str]:
    """Reads one chat line: with line editing and history (prompt_toolkit) on a terminal, plainly from a pipe.
    Raises EOFError at the end (Ctrl-D) and KeyboardInterrupt on Ctrl-C."""
    if not sys.stdin.isatty():
        return input
    from prompt_toolkit import PromptSession

    session: PromptSession = PromptSession()
    return lambda: session.prompt("> ")


def chat_loop(engine, args: argparse.Namespace, read_line: Callable[[], str], interactive: bool) -> None:
    """The chat: each line is a user turn answered with the whole history; /reset, /exit, Ctrl-D leave or clear.
    Ctrl-C while an answer streams stops that answer only (the turn is left out of the history); at the prompt
    it clears the line."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    while True:
        try:
            line = read_line()
        except KeyboardInterrupt:
            continue
        except EOFError:
            if interactive:
                print()  # leave the shell's prompt on a line of its own
            return
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            history = list(system)
            print("(history cleared)")
            continue
        if not command:
            continue
        turn = [{"role": "user", "content": line}]
        try:
            response = _stream(engine, _request(args, messages=history + turn), args,
                               lambda piece: print(piece, end="", flush=True))
        except KeyboardInterrupt:
            print("\n(stopped; this turn is left out of the history)")
            continue
        print()
        history += [*turn, {"role": "assistant", "content": response.text}]


def cmd_chat(args: argparse.Namespace) -> None:
    engine = _load(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_BANNER.format(name=Path(args.model).name if args.model else "the embedded SmolLM2-135M-Instruct"))
    chat_loop(engine, args, _line_reader(), interactive)


def _npy_path(out: Path) -> Path:
    """Where np.save writes `out`: ".npy" is appended unless the name already ends with it."""
    return out if out.name.endswith(".npy") else out.with_name(out.name + ".npy")


def cmd_logits(args: argparse.Namespace) -> None:
    import numpy as np

    out = _npy_path(args.out)
    if not out.parent.is_dir():  # before the model runs, not after
        raise InputError(f"--out {args.out}: the folder {out.parent} does not exist")
    engine = _load(args)
    if args.ids is not None:
        ids = _parse_ids(args.ids)
    else:
        if engine.tokenizer is None:
            raise InputError("this model has no tokenizer: use --ids")
        ids = engine.tokenizer.encode(args.text)
    with _spinner(args, _first_run_note(engine, "computing the logits")):
        logits = engine.logits(ids)
    try:
        np.save(out, logits)
    except OSError as e:
        raise InputError(f"--out {out}: cannot write it ({e.strerror or e})") from None
    if not args.quiet:
        print(f"wrote {out}: logits {logits.shape} {logits.dtype} for {len(ids)} tokens", file=sys.stderr)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--ids must be comma-separated integers, got {text!r}") from None


def _console():
    """Rich output on stdout; piped, it is not wrapped at 80 columns (rich's default without a terminal)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=int(os.environ.get("COLUMNS", 0)) or 240)


def cmd_trace(args: argparse.Namespace) -> None:
    from refllama.testing.engines import ENGINES, llamacpp_trace, refllama_trace
    from refllama.testing.traces import save_trace

    ids = _parse_ids(args.ids)
    if args.engine == "refllama":
        trace, manifest = refllama_trace(args.model, ids, args.dtype, args.backend, args.decode_from)
    elif args.engine == "llamacpp":
        trace, manifest = llamacpp_trace(args.model, ids, kv_cache=args.kv_cache,
                                         flash_attention={"auto": None, "on": True, "off": False}[args.flash_attention])
    else:
        trace, manifest = ENGINES[args.engine](args.model, ids, args.dtype)
    save_trace(args.out, trace, **manifest, model=str(args.model), ids=ids)
    print(f"wrote {args.out}: {len(trace)} tensors from {manifest['engine']} {manifest['version']}", file=sys.stderr)


def cmd_compare(args: argparse.Namespace) -> int:
    """0: every tensor within the profile; 1: one diverges; 2: a usage error or an unreadable model or trace."""
    try:
        return _compare(args)
    except RefLlamaError as e:
        if args.debug:
            raise
        print(f"refllama: error: {e}", file=sys.stderr)
        return 2


def _compare(args: argparse.Namespace) -> int:
    import numpy as np

    from refllama.engine import load
    from refllama.testing.comparison import PROFILES, compare_traces, expert_agreement
    from refllama.testing.traces import label, load_trace

    if args.profile not in PROFILES:
        raise InputError(f"unknown profile {args.profile!r} (one of {', '.join(PROFILES)})")
    if args.plot is not None:
        _pyplot()  # fail before the models run, not after the table is printed
    engines: dict[str, object] = {}

    def engine(path: str, backend: str, dtype: str):
        if (path, backend, dtype) not in engines:
            engines[path, backend, dtype] = load(path, backend=backend, dtype=dtype)
        return engines[path, backend, dtype]

    def token_ids() -> list[int]:
        if args.ids is not None:
            return _parse_ids(args.ids)
        e = engine(args.a, args.backend_a, args.dtype_a)
        if e.tokenizer is None:
            raise InputError(f"{args.a} has no tokenizer: use --ids")
        return e.tokenizer.encode(args.text)

    def trace(path: str, backend: str, dtype: str) -> tuple[dict[str, np.ndarray], str]:
        if path.endswith(".npz"):
            t, manifest = load_trace(path)
            return t, f"{path}: {label(manifest, 'a trace without a manifest')}"
        cached = f", KV cache from {args.decode_from}" if args.decode_from else ""
        return engine(path, backend, dtype).trace(ids, decode_from=args.decode_from), \
            f"{path} (refllama {backend} {dtype}{cached})"

    ids = token_ids()
    b = args.b or args.a
    (ref, label_a), (cand, label_b) = trace(args.a, args.backend_a, args.dtype_a), trace(b, args.backend_b,
                                                                                         args.dtype_b)
    rows = compare_traces(ref, cand, args.profile, allow_missing=True)
    routing = expert_agreement(ref, cand)
    first = next((r for r in rows if not r.ok), None)
    first_routing = next((r for r in routing if r.first_token is not None), None)
    missing = [r.name for r in rows if r.missing]
    labels = [label_a, label_b]
    if args.json:
        print(json.dumps({"reference": labels[0], "candidate": labels[1], "profile": args.profile,
                          "tokens": len(ids), "first_divergence": first.name if first else None,
                          "missing": missing, "rows": [asdict(r) for r in rows],
                          "routing": [asdict(r) for r in routing],
                          "first_routing_difference": first_routing.layer if first_routing else None}, indent=2))
    else:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=escape(f"{labels[1]} vs {labels[0]}, {len(ids)} tokens, profile {args.profile}"))
        for col in ("tensor", "max |diff|", "max |diff| / max |ref|", "NMSE", ""):
            table.add_column(col, justify="left" if col == "tensor" else "right", no_wrap=col == "tensor")
        for r in rows:
            status = "missing" if r.missing else "ok" if r.ok else "[red]DIVERGES[/red]"
            table.add_row(r.name, *(("-",) * 3 if r.missing else (f"{r.max_abs:.3g}", f"{r.rel_max_abs:.3g}",
                                                                  f"{r.nmse:.3g}")), status)
        console = _console()
        console.print(table)
        if missing:
            console.print(f"{len(missing)} tensors of the reference are missing from the candidate")
        console.print(f"first divergence beyond '{args.profile}': {first.name}" if first else
                      f"no tensor diverges beyond the '{args.profile}' profile")
        if routing:
            agreement = ", ".join(f"layer {r.layer} {r.agreement:.3f}" for r in routing)
            console.print(f"expert choice agreement: {agreement}")
            console.print(f"routing first differs at layer {first_routing.layer}, token {first_routing.first_token}"
                          if first_routing else "routing identical in every MoE layer")
    if args.plot is not None:
        _plot([r for r in rows if not r.missing], args.plot, labels)
    return 1 if first else 0


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def _plot(rows, path: Path, labels: list[str]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for suffix in ("residual_attention", "residual", "q", "mlp_output"):
        points = [(int(r.name.split(".")[1]), max(r.nmse, 1e-300)) for r in rows
                  if r.name.startswith("layers.") and r.name.endswith("." + suffix)]
        if points:
            ax.semilogy(*zip(*points, strict=True), marker="o", label=suffix)
    ax.set_xlabel("layer")
    ax.set_ylabel("NMSE vs reference")
    ax.set_title(f"{labels[1]}\nvs {labels[0]}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cmd_bench(args: argparse.Namespace) -> None:
    from refllama.backends import get_backend
    from refllama.diagnostics import benchmark

    get_backend(args.backend, args.dtype)  # import the backend's libraries before the memory baseline
    base = benchmark.rss_mb()
    benchmark.reset_peak_rss()
    start = time.perf_counter()
    engine = _load(args)
    load_s = time.perf_counter() - start
    result = benchmark.measure(engine, args.prompt_tokens, args.new_tokens, args.reps).to_dict()
    result.update(backend=args.backend, dtype=args.dtype, load_s=load_s, rss_base_mb=base,
                  rss_peak_mb=benchmark.peak_rss_mb())
    if args.profile and engine.pipeline is None:  # the profile times one device's operations
        result["decode_profile"] = benchmark.decode_profile(engine, args.prompt_tokens)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.backend} {args.dtype}: prefill {result['prefill_tokens_per_s']:.1f} tok/s "
          f"({args.prompt_tokens} tokens), decode {result['decode_tokens_per_s']:.1f} tok/s "
          f"({args.new_tokens} tokens), time to first token {1e3 * result['time_to_first_token_s']:.0f} ms "
          f"(medians of {args.reps}); load {load_s:.2f} s, peak RSS {result['rss_peak_mb']:.0f} MiB "
          f"({result['rss_peak_mb'] - base:+.0f} MiB over the process before loading)")
    if args.profile:
        profile = result["decode_profile"]
        print(f"one decode step: {profile['step_ms_median']:.2f} ms")
        for op, ms in profile["ms_per_step"].items():
            print(f"  {op:<18} {ms:8.3f} ms  {100 * profile['share'][op]:5.1f}%")


def cmd_convert(args: argparse.Namespace) -> None:
    from refllama.formats.convert import gguf_to_hf

    print(f"wrote {gguf_to_hf(args.gguf, args.out_dir)}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from refllama.diagnostics.diagnostic import ModelDiagnostic, verify
    from refllama.formats.default_model import default_model_path

    path = default_model_path() if args.model is None else args.model
    diag = ModelDiagnostic.analyze_directory(path, backend=args.backend, dtype=args.dtype,
                                             context_length=args.context, batch_size=args.batch,
                                             memory_limit=args.memory_limit)
    limit = diag.memory_limit
    report = diag.to_json()
    plan = None
    if args.shards is not None:
        from refllama.diagnostics.memory import stage_plan

        plan = stage_plan(diag.config, diag.weight_info, args.shards, args.backend, diag.memory_requirements.dtype,
                          args.context, args.batch, limit)
        report["stage_plan"] = plan.to_json()
    verification = verify(path) if args.verify else None
    if verification is not None:
        report["verification"] = {"ok": verification.ok, "checked_tensors": verification.checked_tensors,
                                  "nonfinite": verification.nonfinite, "checksums": verification.checksums,
                                  "manifest": verification.manifest}
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        from refllama.diagnostics.report import render

        render(report, _console())
    need = diag.memory_requirements.total_estimated if plan is None else max(plan.memory_bytes)
    fits = limit is None or need <= limit
    return 0 if not diag.problems and fits and (verification is None or verification.ok) else 1

# --- refllama serve (refllama/serve/, docs/serve.md) ---------------------------------------------------------


def _add_serve_parser(sub) -> None:
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the serve extra)")
    _add_model_options(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--model-name", default=None, help="the id /v1/models reports (default: the folder's name)")
    sv.add_argument("--api-key", default=os.environ.get("REFLLAMA_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $REFLLAMA_API_KEY, else none)")
    sv.add_argument("--max-batch-size", type=int, default=8, help="rows decoded together (default 8)")
    sv.add_argument("--padded-batches", action="store_true",
                    help="batch prompts of different lengths together: faster, but a padded row's logprobs may "
                         "differ in the last bits from the request alone")
    sv.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context")
    sv.add_argument("--max-tokens", type=int, default=4096, help="most tokens one choice may ask for")
    sv.add_argument("--max-body", default="8MB", help="largest request body (default 8MB)")
    sv.add_argument("--max-concurrent", type=int, default=64, help="requests queued or running; more get 429")


def cmd_serve(args: argparse.Namespace) -> None:
    from refllama.diagnostics.memory import parse_bytes
    from refllama.errors import InputError
    from refllama.formats.default_model import default_model_path

    try:
        from refllama import serve
    except ImportError as e:
        raise InputError(f"refllama serve needs the serve extra: pip install 'refllama[serve]' ({e})") from None
    limits = serve.Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                          max_body_bytes=parse_bytes(args.max_body), max_concurrent=args.max_concurrent)
    engine = _load(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"refllama: warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    name = args.model_name or serve.model_id(args.model or default_model_path())
    serve.run(engine, name, args.host, args.port, log_level="warning" if args.quiet else "info", limits=limits,
              api_key=args.api_key, max_batch_size=args.max_batch_size, padded_batches=args.padded_batches)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "logits": cmd_logits, "convert": cmd_convert,
            "inspect": cmd_inspect, "compare": cmd_compare, "bench": cmd_bench, "serve": cmd_serve,
            "trace": cmd_trace}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        args.finish(args)
    try:
        status = COMMANDS[args.command](args)
    except RefLlamaError as e:
        if args.debug:
            raise
        print(f"refllama: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
