"""The `refllama` command: generate, chat, logits, inspect, compare, bench, convert.

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

import numpy as np

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


def _add_model_options(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("model", nargs="?", default=None, help="HF folder or .gguf file (default: embedded SmolLM2)")
    _add_backend_options(p)
    p.add_argument("--quant-semantics", choices=("hf", "vllm"), default="hf",
                   help="W8A8 activation quantization: compressed-tensors/HF or vLLM")
    p.add_argument("--dequantize", action="store_true", help="dequantize weight-only quantized weights at load")
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
    ins.add_argument("--memory-limit", default=None, help="with a unit: 16GB, 512MB, 8GiB")
    ins.add_argument("--verify", action="store_true", help="also read every tensor: NaN/Inf scan, checksums")
    ins.add_argument("--debug", action="store_true", help="show tracebacks")

    cmp = command("compare", "trace two models (or backends, or dtypes) and show where they diverge")
    cmp.add_argument("a", help="reference: a model folder, a .gguf file, or a trace .npz (tools/hf_trace.py)")
    cmp.add_argument("b", nargs="?", default=None, help="candidate (default: A again, with --backend-b/--dtype-b)")
    src = cmp.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", help="comma-separated token ids")
    src.add_argument("--text", help="text, tokenized by A's tokenizer")
    for side, dtype in (("a", "float64"), ("b", "float32")):
        cmp.add_argument(f"--backend-{side}", default="numpy", help=f"backend of {side.upper()}")
        cmp.add_argument(f"--dtype-{side}", default=dtype, help=f"compute dtype of {side.upper()}")
    cmp.add_argument("--profile", default="f32", help="tolerance profile: f64, f32, bf16, int8, q4")
    cmp.add_argument("--json", action="store_true", help="print the rows as JSON")
    cmp.add_argument("--plot", type=Path, default=None, help="write a per-layer error plot (PNG; needs matplotlib)")
    cmp.add_argument("--debug", action="store_true", help="show tracebacks")

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
    try:
        yield live.stop
    finally:
        live.stop()


def _load(args: argparse.Namespace):
    from refllama.engine import load
    from refllama.formats.default_model import default_model_path

    name = Path(args.model).name if args.model else default_model_path().name
    with _spinner(args, f"loading {name} on {args.backend} {args.dtype}"):
        return load(args.model, backend=args.backend, dtype=args.dtype, dequantize=args.dequantize,
                    quant_semantics=args.quant_semantics)


def _first_run_note(engine, doing: str = "generating") -> str:
    """What the spinner says while the model runs: numba compiles its kernels on a first run."""
    if engine.backend.name == "numba":
        from refllama.backends.numba_kernels import cache_dir

        folder = Path(cache_dir())
        if not folder.is_dir() or not any(folder.rglob("*.nbi")):
            return f"{doing} (numba compiles its kernels on this first run, about 20 s; later runs reuse them)"
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


def cmd_compare(args: argparse.Namespace) -> int:
    from refllama.engine import load
    from refllama.testing.compare import PROFILES, compare_traces

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

    def trace(path: str, backend: str, dtype: str) -> dict[str, np.ndarray]:
        if path.endswith(".npz"):
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        return engine(path, backend, dtype).trace(ids)

    ids = token_ids()
    b = args.b or args.a
    rows = compare_traces(trace(args.a, args.backend_a, args.dtype_a), trace(b, args.backend_b, args.dtype_b),
                          args.profile)
    first = next((r for r in rows if not r.ok), None)
    labels = [f"{args.a} ({args.backend_a} {args.dtype_a})", f"{b} ({args.backend_b} {args.dtype_b})"]
    if args.json:
        print(json.dumps({"reference": labels[0], "candidate": labels[1], "profile": args.profile,
                          "tokens": len(ids), "first_divergence": first.name if first else None,
                          "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=escape(f"{labels[1]} vs {labels[0]}, {len(ids)} tokens, profile {args.profile}"))
        for col in ("tensor", "max |diff|", "max |diff| / max |ref|", "NMSE", ""):
            table.add_column(col, justify="left" if col == "tensor" else "right", no_wrap=col == "tensor")
        for r in rows:
            table.add_row(r.name, f"{r.max_abs:.3g}", f"{r.rel_max_abs:.3g}", f"{r.nmse:.3g}",
                          "ok" if r.ok else "[red]DIVERGES[/red]")
        console = _console()
        console.print(table)
        console.print(f"first divergence beyond '{args.profile}': {first.name}" if first else
                      f"no tensor diverges beyond the '{args.profile}' profile")
    if args.plot is not None:
        _plot(rows, args.plot, labels)
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
    from refllama import benchmark
    from refllama.backends import get_backend

    get_backend(args.backend, args.dtype)  # import the backend's libraries before the memory baseline
    base = benchmark.rss_mb()
    benchmark.reset_peak_rss()
    start = time.perf_counter()
    engine = _load(args)
    load_s = time.perf_counter() - start
    result = benchmark.measure(engine, args.prompt_tokens, args.new_tokens, args.reps).to_dict()
    result.update(backend=args.backend, dtype=args.dtype, load_s=load_s, rss_base_mb=base,
                  rss_peak_mb=benchmark.peak_rss_mb())
    if args.profile:
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
    report = diag.to_json()
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
    limit = diag.memory_limit
    fits = limit is None or diag.memory_requirements.total_estimated <= limit
    return 0 if not diag.problems and fits and (verification is None or verification.ok) else 1


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "logits": cmd_logits, "convert": cmd_convert,
            "inspect": cmd_inspect, "compare": cmd_compare, "bench": cmd_bench}


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
