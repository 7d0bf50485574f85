"""Draw docs/architecture.svg from the code: one forward pass, where a backend and a quantized weight plug in, and
the imports between refllama's folders.

    python tools/draw_architecture.py [OUT.svg]      # default docs/architecture.svg

The import graph (`project_modules`, `project_imports`) is read from the sources with `ast`, never by importing
them; tests/test_architecture.py checks the import rules on the same graph. The backends, the operations of
`Backend` and the quantized weight types in the picture are read from backends/ the same way. The SVG is the same
bytes on every run with one matplotlib version (fixed ids, no date, text kept as text).
"""

from __future__ import annotations

import ast
import itertools
import sys
import textwrap
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each package's folder: backends/ is installed as refllama.backends (pyproject's package-dir).
SOURCES = {"refllama": ROOT / "refllama", "refllama.backends": ROOT / "backends"}
# The top-level modules every folder imports; the picture draws them apart from the entry points (engine, cli, ...).
SHARED = ("refllama.config", "refllama.dtypes", "refllama.errors")


# --- the import graph -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Import:
    """`importer` names project module `module` at `line`. `name` is the imported name when it is not a module
    itself: `from refllama.config import LlamaConfig` is module refllama.config, name LlamaConfig, while
    `from refllama.model import ops` is module refllama.model.ops, name None."""

    importer: str
    module: str
    line: int
    name: str | None = None


def project_modules() -> dict[str, Path]:
    """Every module of refllama/ and backends/ by its dotted name (a package by its `__init__.py`)."""
    modules = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def project_imports(modules: dict[str, Path]) -> list[Import]:
    """Every import of a project module, at any depth (function-level ones too), except under `if TYPE_CHECKING:`."""
    out = []
    for importer, path in modules.items():
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for node in _import_nodes(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                out += [Import(importer, a.name, node.lineno) for a in node.names if _is_project(a.name)]
                continue
            base = _absolute(package, node.level, node.module)
            if not _is_project(base):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append(Import(importer, sub, node.lineno) if sub in modules
                           else Import(importer, base, node.lineno, alias.name))
    return out


def top_level_names(path: Path) -> set[str]:
    """The names a module binds at run time outside functions and classes ("*" when it star-imports)."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)  # names bound only for type checkers do not exist at run time
            else:  # if, try, with, for: their blocks run at import time too
                for block in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, block, []))

    visit(ast.parse(path.read_text(), str(path)).body)
    return names


def folder(module: str) -> str:
    """The folder a module lives in ("model", "backends", ...), or "top-level" for refllama/*.py."""
    parts = module.split(".")
    packaged = len(parts) > 1 and (f"refllama.{parts[1]}" in SOURCES or (SOURCES["refllama"] / parts[1]).is_dir())
    return parts[1] if packaged else "top-level"


def _is_project(module: str | None) -> bool:
    return module is not None and (module == "refllama" or module.startswith("refllama."))


def _absolute(package: str, level: int, module: str | None) -> str | None:
    if level == 0:
        return module
    base = package.rsplit(".", level - 1)[0] if level > 1 else package
    return f"{base}.{module}" if module else base


def _import_nodes(nodes: Iterable[ast.AST]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements among `nodes` and inside them at any depth, except in an `if TYPE_CHECKING:` body."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_nodes(node.orelse)
        else:
            yield from _import_nodes(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


# --- what the picture says about backends, read from backends/ ------------------------------------------------

@dataclass(frozen=True)
class BackendFacts:
    name: str  # from the file name, backends/NAME_backend.py
    kernels: tuple[str, ...]  # the quantized weight types in its linear_kernels
    fallback: str  # quantized_fallback: what happens to the other types


def backend_facts() -> list[BackendFacts]:
    """Each backend's quantized fast paths and fallback, from the assignments in its module."""
    out = []
    for path in sorted((ROOT / "backends").glob("*_backend.py")):
        kernels: tuple[str, ...] = ()
        fallback = _class_default("quantized_fallback")
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Assign) or not isinstance(node.targets[0], (ast.Name, ast.Attribute)):
                continue
            target = node.targets[0]
            attr = target.id if isinstance(target, ast.Name) else target.attr
            if attr == "linear_kernels" and isinstance(node.value, ast.Dict):
                kernels = tuple(ast.unparse(k) for k in node.value.keys if k is not None)
            elif attr == "quantized_fallback":
                fallback = ast.literal_eval(node.value)
        out.append(BackendFacts(path.stem.removesuffix("_backend"), kernels, fallback))
    return out


def backend_interface() -> tuple[list[str], list[str], list[str]]:
    """From backends/base.py: the declared facts of `Backend`, its operations, and QUANTIZED_WEIGHTS."""
    tree = ast.parse((ROOT / "backends" / "base.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Backend")
    facts = [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and "ClassVar" in ast.unparse(n.annotation)]
    ops = [n.name for n in cls.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
    quantized = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                     and ast.unparse(n.targets[0]) == "QUANTIZED_WEIGHTS")
    return facts, ops, [ast.unparse(e) for e in quantized.elts]


def _class_default(attr: str) -> str:
    tree = ast.parse((ROOT / "backends" / "base.py").read_text())
    return next(ast.literal_eval(n.value) for n in ast.walk(tree)
                if isinstance(n, ast.AnnAssign) and ast.unparse(n.target) == attr)


# --- the picture ---------------------------------------------------------------------------------------------------
# Coordinates are pixels of a W x H canvas, y downwards.

W, H = 1500, 920
INK, GREY, FLOW, PLUG, LINK, ARC = "#222222", "#8c8c8c", "#e8f0fb", "#fdf1dc", "#b07a1c", "#2f6db5"
# The folders in one column, top to bottom, so that most imports point downwards.
COLUMN = ("serve", "sharding", "testing", "diagnostics", "generation", "backends", "formats", "quant", "model")


def draw(out: Path) -> None:
    """Write the picture as SVG to `out`."""
    import matplotlib

    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "refllama", "svg.fonttype": "none", "font.family": "sans-serif",
                         "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"]})
    fig = plt.figure(figsize=(W / 100, H / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.axis("off")
    _draw_forward_pass(ax)
    _draw_folders(ax)
    fig.savefig(out, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)


def _draw_forward_pass(ax) -> None:
    ax.text(20, 22, "One forward pass: refllama/model/llama.py, top to bottom", fontsize=12, weight="bold")
    ax.text(20, 42, "xp is the backend; what each xp.op computes is written out in refllama/model/ops.py",
            fontsize=9, color="#555555")
    x, w = 20, 340
    flow = [  # (top, height, text, inside the layer loop)
        (62, 26, "token ids (B, T)", False),
        (104, 40, "step_inputs: cos, sin = rope.cos_sin(positions)  (rope.py)\n"
                  "mask (B, T, S): causal and padding", False),
        (160, 26, "x = xp.embedding(embed_tokens, ids)   (B, T, hidden)", False),
        (236, 24, "h = xp.rms_norm(x, input_layernorm)", True),
        (272, 108, "attention\n  q, k, v = xp.linear(h, q_proj | k_proj | v_proj)\n"
                   "  q, k = xp.apply_rope(q | k, cos, sin)\n  k, v = cache.update(i, k, v)   (kv_cache.py)\n"
                   "  o = xp.attention(q, k, v, mask)   (GQA)\n  x = x + xp.linear(o, o_proj)", True),
        (392, 24, "h = xp.rms_norm(x, post_attention_layernorm)", True),
        (428, 78, "mlp\n  g, u = xp.linear(h, gate_proj | up_proj)\n  a = xp.gated_activation(g, u, hidden_act)\n"
                  "  x = x + xp.linear(a, down_proj)", True),
        (538, 40, "head: x = xp.rms_norm(x, norm)\nlogits = xp.linear(x, lm_head or embed_tokens)", False),
        (594, 26, "logits (B, T, vocab)", False),
    ]
    _box(ax, x - 8, 202, w + 16, 318, "", "#ffffff", zorder=0)
    ax.text(x, 208, "forward_layers(x, first, last, cache, step): each layer i", fontsize=8.5, style="italic",
            va="top")
    for top, h, text, in_layer in flow:
        color = FLOW if "xp." in text else "#f4f4f4"
        if in_layer:
            _box(ax, x + 8, top, w - 16, h, text, color, size=8.5, centre=h < 30)
        else:
            _box(ax, x, top, w, h, text, color, size=8.5, centre=True)
    for (top, h, *_), (nxt, *_) in itertools.pairwise(flow):
        _arrow(ax, (x + w / 2, top + h), (x + w / 2, nxt), zorder=4)

    facts, ops, quantized = backend_interface()
    backends = backend_facts()
    bx, bw = 385, 300
    _box(ax, bx, 104, bw, 196,
         "A backend runs every xp.op\n"
         "backends/NAME_backend.py sets BACKEND to a\n"
         "subclass of Backend (backends/base.py); the\n"
         "registry, backends/__init__.py, finds it by\n"
         f"its file name: {', '.join(b.name for b in backends)}.\n\n"
         f"declares: {_wrap(', '.join(facts), 44, '    ')}\n"
         f"ops: {_wrap(', '.join(ops), 44, '    ')}", PLUG, size=8)
    _arrow(ax, (bx, 210), (x + w + 8, 240), color=LINK, lw=1.2, linestyle="--")

    kernels = [f"  {q}: {', '.join(b.name for b in backends if q in b.kernels) or 'none'}" for q in quantized]
    raising = [b.name for b in backends if b.fallback == "raise"]
    _box(ax, bx, 320, bw, 300,
         "A Linear's weight, in xp.linear(x, Linear)\n"
         "a float array: backend.matmul(x, weight)\n"
         "a quantized weight (refllama/quant), which\n"
         "carries .matmul(x) and .dequantize(dtype):\n"
         "  the backend's linear_kernels[type] if it has\n"
         "  one, else its quantized_fallback: \"reference\"\n"
         "  runs weight.matmul on the host, \"raise\"\n"
         "  raises BackendError.\n"
         "Loaders build the weights: formats/checkpoint.py\n"
         "with quant/loader.py; formats/gguf_llama.py for\n"
         "GGUF blocks a backend reads as stored.\n\n"
         "Kernels, by weight type:\n" + "\n".join(kernels) + "\n"
         f"  no kernel: {', '.join(raising) or 'no backend'} raise, the others\n  run the reference", PLUG, size=8)
    for target in (300, 470):
        _arrow(ax, (bx, 390), (x + w + 8, target), color=LINK, lw=1.2, linestyle="--")
    ax.text(x, 660, "Dashed: where a backend and a quantized weight plug in. Right: solid grey arrows run from the\n"
            "entry points (engine, cli, loading, ...) and into the shared modules (config, dtypes, errors);\n"
            "blue ones run between the folders, back into the top level and out of the shared modules.\n"
            "The import rules: tests/test_architecture.py.", fontsize=8.5, color="#555555", va="top", linespacing=1.4)


def _draw_folders(ax) -> None:
    modules = project_modules()
    group = {m: "shared" if m in SHARED else folder(m) for m in modules}
    if unplaced := set(group.values()) - {*COLUMN, "top-level", "shared"}:
        raise SystemExit(f"new folders {sorted(unplaced)}: give them a place in COLUMN")
    pairs = Counter((group[a], group[b]) for a, b in sorted({(e.importer, e.module) for e in project_imports(modules)}))
    left = 720
    ax.text(left, 22, "Imports between folders, read from the code", fontsize=12, weight="bold")
    ax.text(left, 42, "A -> B: modules in A import modules in B; the number counts the (importer, imported) pairs",
            fontsize=9, color="#555555")

    def listing(g: str, sep: str) -> str:
        return sep.join(sorted("__init__" if path.name == "__init__.py" else m.rpartition(".")[2]
                               for m, path in modules.items() if group[m] == g))

    top, bottom, bar = 62, 900, 100
    ex, sx = left, W - 10 - bar  # the entry points' bar on the left, the shared modules' bar on the right
    _box(ax, ex, top, bar, bottom - top, "refllama/\n(top level)\n\n" + listing("top-level", "\n"), "#f4f4f4")
    _box(ax, sx, top, bar, bottom - top, "refllama/\n(top level,\nshared)\n\n" + listing("shared", "\n"), "#f4f4f4")
    cx, cw, gap = ex + bar + 90, 240, 20
    bh = (bottom - 30 - top - gap * (len(COLUMN) - 1)) / len(COLUMN)
    y = {g: top + i * (bh + gap) for i, g in enumerate(COLUMN)}
    for g in COLUMN:
        _box(ax, cx, y[g], cw, bh, "", FLOW)
        ax.text(cx + 8, y[g] + 7, f"{g}/", fontsize=10, weight="bold", va="top", zorder=3)
        ax.text(cx + 8, y[g] + 25, _wrap(listing(g, ", "), 40, ""), fontsize=8, va="top", zorder=3,
                linespacing=1.3)

    def link(a: tuple[float, float], b: tuple[float, float], n: int, at: tuple[float, float], color: str,
             **kw) -> None:
        _arrow(ax, a, b, color=color, lw=0.6 + n ** 0.5 / 2, **kw)
        ax.text(*at, str(n), fontsize=8, color=color, ha="center", va="center", zorder=5,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none"})

    # Straight arrows: the entry points into each folder (left), each folder into the shared modules (right).
    for g in COLUMN:
        upper, lower = y[g] + bh * 0.35, y[g] + bh * 0.65
        if n := pairs.get(("top-level", g)):
            link((ex + bar, upper), (cx, upper), n, (ex + bar + 40, upper), GREY)
        if n := pairs.get((g, "top-level")):
            link((cx, lower), (ex + bar, lower), n, (ex + bar + 40, lower), ARC)
        if n := pairs.get((g, "shared")):
            link((cx + cw, y[g] + bh - 10), (sx, y[g] + bh - 10), n, (sx - 25, y[g] + bh - 10), GREY)
        if n := pairs.get(("shared", g)):
            link((sx, y[g] + bh - 24), (cx + cw, y[g] + bh - 24), n, (sx - 25, y[g] + bh - 24), ARC)
    if n := pairs.get(("top-level", "shared")):
        link((ex + bar, bottom - 12), (sx, bottom - 12), n, (sx - 25, bottom - 12), GREY)

    # Imports between folders of the column: nested arcs, downwards on its right side, upwards on its left.
    rank = {g: i for i, g in enumerate(COLUMN)}
    arcs = sorted(((a, b) for a, b in pairs if a in rank and b in rank and a != b),
                  key=lambda p: (abs(rank[p[0]] - rank[p[1]]), rank[p[0]], rank[p[1]]))
    arm = {p: 16 + 13 * i for i, p in enumerate(arcs)}
    out_port = {p: i for a in COLUMN for i, p in enumerate(sorted((q for q in arcs if q[0] == a),
                                                                  key=lambda q: -arm[q]))}
    in_port = {p: i for b in COLUMN for i, p in enumerate(sorted((q for q in arcs if q[1] == b),
                                                                 key=lambda q: arm[q]))}
    for a, b in arcs:
        down = rank[b] > rank[a]
        side, sign, angle = (cx + cw, 1, 0) if down else (cx, -1, 180)
        reach = arm[a, b] if down else 24
        ya, yb = y[a] + bh * 0.45 + 7 * out_port[a, b], y[b] + 8 + 7 * in_port[a, b]
        if not down:
            ya, yb = y[a] + 10 + 7 * out_port[a, b], y[b] + bh * 0.85 - 7 * in_port[a, b]
        link((side, ya), (side, yb), pairs[a, b], (side + sign * reach, (ya + yb) / 2), ARC, zorder=4,
             connectionstyle=f"arc,angleA={angle},angleB={angle},armA={reach},armB={reach},rad=5")


def _box(ax, x: float, y: float, w: float, h: float, text: str, color: str, size: float = 9,
         centre: bool = False, zorder: int = 2) -> None:
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=6", fc=color, ec=INK, lw=0.8,
                                zorder=zorder))
    if text:
        ax.text(x + w / 2 if centre else x + 8, y + h / 2 if centre else y + 7, text, fontsize=size, zorder=3,
                va="center" if centre else "top", ha="center" if centre else "left", linespacing=1.35, color=INK)


def _arrow(ax, a: tuple[float, float], b: tuple[float, float], color: str = INK, lw: float = 1.0, **kw) -> None:
    from matplotlib.patches import FancyArrowPatch

    kw.setdefault("zorder", 1)
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=10, color=color, lw=lw, **kw))


def _wrap(text: str, width: int, indent: str) -> str:
    return textwrap.fill(text, width, subsequent_indent=indent, break_on_hyphens=False)


if __name__ == "__main__":
    draw(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "architecture.svg")
