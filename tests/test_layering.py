"""The code's own structure rules: no import circle in embedtune/ (function-level imports count: a
late import only hides a circle), and no module in embedtune/ or cluster/ over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports anywhere in its file (top level, inside
    functions, under `if TYPE_CHECKING` alike). `from a import b` is an edge to `a.b` when that is a
    module, else to `a`; the parent packages a dotted import runs first are not edges (every
    package's `__init__` imports its own submodules, which is no circle)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    out.add(sub)
                elif base in known:
                    out.add(base)
    out.discard(name)
    return out


def import_graph(package: str) -> dict[str, set[str]]:
    mods = _modules(package)
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph`: one per strongly connected component of more than one module
    (Tarjan), each given as a closed path through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(_path(graph, set(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A closed walk start -> ... -> start inside one component (for the failure message)."""
    start = min(comp)
    prev: dict[str, str] = {}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & comp):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [start, *reversed(path[:-1]), start] if v != start else [start, start]
            if w not in prev:
                prev[w] = v
                todo.append(w)
    return sorted(comp)


def test_cycle_finder_sees_a_hidden_circle(tmp_path: Path) -> None:
    """The checker itself: a circle closed by an import inside a function is found, a chain is not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import g\n")
    (pkg / "c.py").write_text("import os\n\ndef g():\n    from . import a\n")
    (pkg / "d.py").write_text("from pkg.b import f\n")
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d"}
    graph = {m: imports_of(m, pkg / f"{m.split('.')[-1]}.py", known) for m in known if m != "pkg"}
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.b"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    graph["pkg.c"] = set()
    assert cycles(graph) == []


def unit_graph(graph: dict[str, set[str]], package: str) -> dict[str, set[str]]:
    """`graph` with every module folded into its top-level unit of `package` (a subpackage such as
    `embedtune.rerank`, or a module such as `embedtune.evaluate`): importing `a.b.c` runs `a.b`'s
    `__init__` first, so `evaluate -> rerank` and `rerank.gate -> evaluate` are a circle even though
    no two modules import each other."""
    depth = package.count(".") + 2

    def unit(m: str) -> str:
        return ".".join(m.split(".")[:depth])

    out: dict[str, set[str]] = {}
    for m, targets in graph.items():
        out.setdefault(unit(m), set()).update(unit(t) for t in targets if unit(t) != unit(m))
    return out


def test_cycle_finder_sees_a_circle_between_packages() -> None:
    graph = {
        "pkg.evaluate": {"pkg.rerank"},
        "pkg.rerank": {"pkg.rerank.train"},
        "pkg.rerank.gate": {"pkg.evaluate"},
        "pkg.rerank.train": set(),
    }
    assert cycles(graph) == []  # no two modules import each other ...
    assert cycles(unit_graph(graph, "pkg")) == [["pkg.evaluate", "pkg.rerank", "pkg.evaluate"]]  # ... yet


def test_embedtune_has_no_import_circle() -> None:
    graph = import_graph("embedtune")
    assert len(graph) > 50 and graph["embedtune.sweep.driver"]  # the walk saw the package
    found = cycles(graph)
    assert not found, "import circles (late imports included):\n" + "\n".join(" -> ".join(c) for c in found)
    found = cycles(unit_graph(graph, "embedtune"))
    assert not found, "import circles between packages (late imports included):\n" + "\n".join(
        " -> ".join(c) for c in found
    )


@pytest.mark.parametrize("package", ["embedtune", "cluster"])
def test_no_module_over_500_lines(package: str) -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in sorted((ROOT / package).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them along a seam): {long}"
