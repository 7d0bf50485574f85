"""The import rules of docs/architecture.md, checked on the import graph of refllama/ and backends/ (about 1.5 s).

The graph is read from the sources with `ast` (tools/draw_architecture.py), nothing is imported: every import of a
project module counts, at module level or inside a function, except those under `if TYPE_CHECKING:` (they never
run). `from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg`.

An edge goes to the module named, not to its parent packages. At run time `import refllama.model.ops` executes
`refllama/__init__.py` first, which imports the engine and so nearly everything; counting that would make every
module depend on every other and no rule could hold. `from refllama import x` with x not a module is an edge to
`refllama` itself, and that one does count (it runs the engine's imports to give x).
"""

from __future__ import annotations

import graphlib
import itertools
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from draw_architecture import Import, project_imports, project_modules, top_level_names  # noqa: E402

MODULES = project_modules()
IMPORTS = project_imports(MODULES)
# What a backend must not depend on, directly or through other modules: the engine and everything above the model.
ABOVE_BACKENDS = ("refllama.engine", "refllama.model.llama", "refllama.generation", "refllama.cli",
                  "refllama.loading", "refllama.diagnostics")


def _where(edge: Import) -> str:
    return f"{MODULES[edge.importer].relative_to(ROOT)}:{edge.line} imports {edge.module}"


def _graph(imports: list[Import]) -> dict[str, dict[str, Import]]:
    """importer -> {module: the first import of it}, each module's edges in a fixed order."""
    graph: dict[str, dict[str, Import]] = defaultdict(dict)
    for edge in sorted(imports, key=lambda e: (e.importer, e.line)):
        graph[edge.importer].setdefault(edge.module, edge)
    return graph


def find_cycle(imports: list[Import]) -> list[Import]:
    """The edges of one import cycle, each importing the next one's importer; [] when there is none."""
    graph = _graph(imports)
    try:
        graphlib.TopologicalSorter({m: list(targets) for m, targets in graph.items()}).prepare()
    except graphlib.CycleError as e:
        cycle = e.args[1]  # [m0, ..., m0], each importing the one before it
        return [graph[b][a] for a, b in itertools.pairwise(cycle)][::-1]
    return []


def reaches(imports: list[Import], start: str, forbidden: tuple[str, ...]) -> list[Import]:
    """The shortest chain of imports from `start` to a module in (or under) `forbidden`; [] when none."""
    graph = _graph(imports)
    chain: dict[str, list[Import]] = {start: []}
    frontier = [start]
    while frontier:
        nxt = []
        for module in frontier:
            for target, edge in graph.get(module, {}).items():
                if target in chain:
                    continue
                chain[target] = [*chain[module], edge]
                if any(target == f or target.startswith(f + ".") for f in forbidden):
                    return chain[target]
                nxt.append(target)
        frontier = nxt
    return []


def test_the_graph_sees_every_kind_of_import():
    """Guards the other tests against an empty or partial graph: a function-level import, an import of a package's
    submodule by `from pkg import module`, the backends package found under its installed name, and an import
    under `if TYPE_CHECKING:` left out."""
    edges = {(e.importer, e.module) for e in IMPORTS}
    assert len(MODULES) > 40 and len(IMPORTS) > 200
    assert ("refllama.cli", "refllama.engine") in edges  # inside cmd_generate
    assert ("refllama.backends.numpy_backend", "refllama.model.ops") in edges  # from refllama.model import ops
    assert ("refllama.backends", "refllama.backends.base") in edges
    assert ("refllama.formats.checkpoint", "refllama.formats.gguf_llama") not in edges  # TYPE_CHECKING only


def test_cycle_finder_names_the_modules_and_lines():
    edges = [Import("a", "b", 3), Import("b", "c", 5), Import("c", "a", 7), Import("c", "d", 8)]
    assert find_cycle(edges) in ([edges[0], edges[1], edges[2]], [edges[1], edges[2], edges[0]],
                                 [edges[2], edges[0], edges[1]])
    assert find_cycle(edges[:2] + edges[3:]) == []
    assert reaches(edges, "a", ("d",)) == [edges[0], edges[1], edges[3]]


def test_no_import_cycle():
    cycle = find_cycle(IMPORTS)
    assert not cycle, "import cycle:\n  " + "\n  ".join(_where(e) for e in cycle)


def test_imports_name_what_exists():
    """Every import names a project module that exists, and `from M import name` a name M defines."""
    missing = [e for e in IMPORTS if e.module not in MODULES]
    assert not missing, "\n".join(_where(e) + ": no such module" for e in missing)
    defined = {m: top_level_names(MODULES[m]) for m in {e.module for e in IMPORTS if e.name is not None}}
    undefined = [e for e in IMPORTS if e.name is not None and not {e.name, "*"} & defined[e.module]]
    assert not undefined, "\n".join(f"{_where(e)}: it defines no {e.name!r}" for e in undefined)


@pytest.mark.parametrize("backend_module", sorted(m for m in MODULES if m.startswith("refllama.backends")))
def test_backends_stay_below_the_engine(backend_module):
    """A backend implements operations on arrays; it must not need the engine, the model's forward pass,
    generation, loading, diagnostics or the command line, not even through another module."""
    chain = reaches(IMPORTS, backend_module, ABOVE_BACKENDS)
    assert not chain, f"{backend_module} depends on {chain[-1].module}:\n  " + "\n  ".join(_where(e) for e in chain)


def test_ops_needs_only_the_config():
    """refllama/model/ops.py is the reference arithmetic; it stands on NumPy and the config's ActivationType."""
    used = {e.module for e in IMPORTS if e.importer == "refllama.model.ops"}
    assert used <= {"refllama.config"}, f"refllama/model/ops.py imports {sorted(used)}"
