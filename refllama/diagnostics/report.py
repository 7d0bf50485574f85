"""`refllama inspect`'s human-readable report: rich tables over the JSON report (ModelDiagnostic.to_json)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from refllama.diagnostics.memory import format_bytes


def render(report: dict[str, Any], console: Console | None = None) -> None:
    """Print the report. Text from the model or the environment (paths, notes, problems) is escaped: rich would
    read `[mlx]` in `pip install -e ".[mlx]"` as markup and drop it."""
    console = console or Console()
    variant = report["model_type"]
    detail = ", ".join(f"{k}={v}" for k, v in variant.items() if k != "kind")
    c, w, m, t = report["config"], report["weights"], report["memory"], report["tokenizer"]
    console.print(f"[bold]{escape(report['model_path'])}[/bold]")
    console.print(f"variant: [bold]{variant['kind']}[/bold]({detail})")

    model = Table(title="model", show_header=False)
    rows = [("parameters", f"{w['parameter_count']:,} (config implies {w['config_parameter_count']:,})"),
            ("layers x hidden", f"{c['num_hidden_layers']} x {c['hidden_size']} "
                                f"(intermediate {c['intermediate_size']})"),
            ("heads / kv heads / head_dim", f"{c['num_attention_heads']} / {c['num_key_value_heads']} / "
                                            f"{c['head_dim']}"),
            *([("experts", _experts(c["moe"], w["active_parameter_count"]))] if c.get("moe") else []),
            ("vocabulary", f"{c['vocab_size']:,}"), ("context", f"{c['max_position_embeddings']:,}"),
            ("rope", f"theta {c['rope_theta']:g}, scaling {c['rope_scaling'] or 'none'}"),
            ("tied embeddings", str(c["tie_word_embeddings"])),
            ("quantization", "none" if not report["quantization"] else
             f"{report['quantization']['method']} {report['quantization']['format']}"),
            ("tokenizer", f"{t['type']} ({t['source']}), {t['vocab_size'] or '?'} tokens, chat template: "
                          f"{'yes' if t['has_chat_template'] else 'no'}")]
    for k, v in rows:
        model.add_row(k, escape(v))
    console.print(model)

    console.print(f"weights: {w['tensor_count']} tensors in {len(w['files'])} file(s), "
                  f"{format_bytes(w['total_bytes'])} on disk, {w['quantized_tensors']} quantized")
    weights = Table()
    weights.add_column("dtype")
    weights.add_column("tensors", justify="right")
    for dtype, count in w["dtype_histogram"].items():
        weights.add_row(dtype, str(count))
    console.print(weights)

    console.print(f"memory on {m['backend']} in {m['dtype']}, context {m['context_length']:,}, "
                  f"batch {m['batch_size']}:")
    memory = Table()
    memory.add_column("part")
    memory.add_column("bytes", justify="right")
    for key in ("model_weights", "kv_cache", "activation_memory", "runtime_overhead", "total_estimated"):
        memory.add_row(key.replace("_", " "), format_bytes(m[key]))
    console.print(memory)
    for r in m["recommendations"]:
        figures = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("kind", "plan"))
        layers = ", ".join(f"{a}-{b - 1}" for a, b in zip(r["plan"]["bounds"], r["plan"]["bounds"][1:],
                                                           strict=False)) if r.get("plan") else ""
        console.print(f"  recommendation: {r['kind']}({figures}){f' layers {layers}' if layers else ''}")
    if "stage_plan" in report:
        plan = Table(title=f"pipeline stages (memory per stage, context {m['context_length']:,}; docs/sharding.md)")
        for col in ("stage", "layers", "count", "weights", "memory", "weight files it reads"):
            plan.add_column(col, justify="left" if col in ("layers", "weight files it reads") else "right")
        for i, stage in enumerate(report["stage_plan"]["stages"]):
            first, last = stage["layers"]
            files = stage["files"]
            named = ", ".join(files) if len(files) <= 2 else f"{files[0]} .. {files[-1]} ({len(files)})"
            plan.add_row(str(i), f"{first}-{last - 1}", str(last - first), format_bytes(stage["weight_bytes"]),
                         format_bytes(stage["memory_bytes"]), named)
        console.print(plan)
        if report["memory_limit"] is not None:
            largest = max(stage["memory_bytes"] for stage in report["stage_plan"]["stages"])
            fits = "fits" if largest <= report["memory_limit"] else "does NOT fit"
            console.print(f"the largest stage {fits} the limit of {format_bytes(report['memory_limit'])} per node")

    backends = Table(title="backends")
    for col in ("backend", "available", "dtypes", "note"):
        backends.add_column(col)
    for b in report["backends"]:
        backends.add_row(b["backend"], "yes" if b["available"] else "no", ", ".join(b["dtypes"]), escape(b["note"]))
    console.print(backends)
    if "verification" in report:
        v = report["verification"]
        console.print(f"verification: {'ok' if v['ok'] else 'FAILED'} ({v['checked_tensors']} tensors; "
                      f"non-finite: {v['nonfinite'] or 'none'}; checksums: {v['checksums'] or 'no manifest'})")
    for p in report["problems"]:
        console.print(f"[red]problem:[/red] {escape(p)}")
    console.print(f"[bold]verdict:[/bold] {escape(report['verdict'])}")


def _experts(moe: dict[str, Any], active: int) -> str:
    shared = ", shared expert" if moe["shared_expert"] else ""
    return (f"{moe['num_experts']} ({moe['router']} router, top {moe['top_k']}, {len(moe['layers'])} MoE layers"
            f"{shared}), {active:,} parameters active per token")
