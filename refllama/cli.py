"""The `refllama` command: generate, chat, logits, convert.

MODEL is a Hugging Face folder or a .gguf file; omitted, it is the embedded default (SmolLM2-135M-Instruct).
Exit codes: 0 ok, 2 usage, 1 model or input error (one line on stderr; the traceback only with --debug).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from refllama.errors import RefLlamaError


def _add_model_options(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("model", nargs="?", default=None, help="HF folder or .gguf file (default: embedded SmolLM2)")
    p.add_argument("--backend", default="numpy", help="array backend (numpy, mlx, ...)")
    p.add_argument("--dtype", default="float32", help="compute dtype (float32, float64, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or speed report")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refllama", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt")
    _add_model_options(g)
    g.add_argument("-p", "--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    _add_sampling_options(g)
    g.add_argument("--logprobs", type=int, default=None, help="top alternatives per token (with --json)")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--json", action="store_true", help="print the whole response as JSON")

    c = sub.add_parser("chat", help="interactive chat (/reset clears the history, /exit leaves)")
    _add_model_options(c)
    c.add_argument("--system", default=None, help="a system message")
    _add_sampling_options(c)

    lg = sub.add_parser("logits", help="write the logits of every position to a .npy file")
    _add_model_options(lg)
    src = lg.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--ids", help="comma-separated token ids")
    lg.add_argument("--out", required=True, type=Path)

    ins = sub.add_parser("inspect", help="diagnose a model from its headers: variant, weights, memory, backends")
    ins.add_argument("model", nargs="?", default=None, help="HF folder or .gguf file (default: embedded SmolLM2)")
    ins.add_argument("--json", action="store_true", help="print the report as JSON (schema: docs/inspect.md)")
    ins.add_argument("--backend", default="numpy")
    ins.add_argument("--dtype", default="float32")
    ins.add_argument("--context", type=int, default=None, help="context length (default: the model's maximum)")
    ins.add_argument("--batch", type=int, default=1)
    ins.add_argument("--memory-limit", default=None, help="e.g. 16GB, 512MB")
    ins.add_argument("--verify", action="store_true", help="also read every tensor: NaN/Inf scan, checksums")
    ins.add_argument("--debug", action="store_true", help="show tracebacks")

    cv = sub.add_parser("convert", help="write a GGUF model as a Hugging Face folder")
    cv.add_argument("gguf", type=Path)
    cv.add_argument("out_dir", type=Path)
    cv.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _load(args: argparse.Namespace):
    from refllama.engine import load

    progress = None if args.quiet or not sys.stderr.isatty() else _progress_bar()
    return load(args.model, backend=args.backend, dtype=args.dtype, progress=progress)


def _progress_bar() -> Callable[[int, int], None]:
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="loading weights", unit="tensor", file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


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


def cmd_generate(args: argparse.Namespace) -> None:
    engine = _load(args)
    source = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
    request = _request(args, **source)
    if args.stream and not args.json:
        for piece in engine.stream(request):
            print(piece, end="", flush=True)
        print()
        return
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


def cmd_chat(args: argparse.Namespace) -> None:
    engine = _load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = list(system)
            print("(history cleared)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        text = ""
        for piece in engine.stream(_request(args, messages=history)):
            text += piece
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": text})


def cmd_logits(args: argparse.Namespace) -> None:
    from refllama.errors import InputError

    engine = _load(args)
    if args.ids is not None:
        try:
            ids = [int(x) for x in args.ids.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    else:
        if engine.tokenizer is None:
            raise InputError("this model has no tokenizer: use --ids")
        ids = engine.tokenizer.encode(args.text)
    logits = engine.logits(ids)
    np.save(args.out, logits)
    if not args.quiet:
        print(f"wrote {args.out}: logits {logits.shape} {logits.dtype} for {len(ids)} tokens", file=sys.stderr)


def cmd_convert(args: argparse.Namespace) -> None:
    from refllama.convert import gguf_to_hf

    print(f"wrote {gguf_to_hf(args.gguf, args.out_dir)}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from refllama.default_model import default_model_path
    from refllama.diagnostic import ModelDiagnostic, verify
    from refllama.memory import parse_bytes

    path = default_model_path() if args.model is None else args.model
    limit = parse_bytes(args.memory_limit) if args.memory_limit else None
    diag = ModelDiagnostic.analyze_directory(path, backend=args.backend, dtype=args.dtype,
                                             context_length=args.context, batch_size=args.batch, memory_limit=limit)
    report = diag.to_json()
    verification = verify(path) if args.verify else None
    if verification is not None:
        report["verification"] = {"ok": verification.ok, "checked_tensors": verification.checked_tensors,
                                  "nonfinite": verification.nonfinite, "checksums": verification.checksums,
                                  "manifest": verification.manifest}
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        from refllama.inspect_report import render

        render(report)
    fits = limit is None or diag.memory_requirements.total_estimated <= limit
    return 0 if not diag.problems and fits and (verification is None or verification.ok) else 1


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "logits": cmd_logits, "convert": cmd_convert,
            "inspect": cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
