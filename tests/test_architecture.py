"""The import graph of src/malex, read with `ast`: no import circles, and every arrow points down the floors of
docs/ARCHITECTURE.md. Every import counts, including those inside functions and under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: the floors, lowest first; a package may import its own modules and packages on lower floors only. The
#: ground floor (errors; the package itself with its version; device, progress, atomic writes, thresholds;
#: metrics) is split into three so that its arrows are checked too.
FLOORS: tuple[frozenset[str], ...] = (
    frozenset({"malex.errors"}),
    frozenset({"malex", "malex.device", "malex.progress", "malex.atomic", "malex.calibration", "malex.cluster"}),
    frozenset({"malex.metrics"}),
    frozenset({"malex.data"}),
    frozenset({"malex.models"}),
    frozenset({"malex.probe"}),
    frozenset({"malex.attacks", "malex.detectors"}),
    frozenset({"malex.guard"}),
    frozenset({"malex.report"}),
    frozenset({"malex.evaluate", "malex.serve", "malex.scan"}),
    frozenset({"malex.cli"}),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in (SRC / "malex").rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The malex modules `path` imports (`from pkg import name` counts as pkg.name when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                    for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; malex imports by absolute name")
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def package(module: str) -> str:
    """The floor unit of a module: malex.X for malex.X.Y..., malex itself for the package's __init__."""
    return ".".join(module.split(".")[:2])


def floor(unit: str) -> int:
    for i, members in enumerate(FLOORS):
        if unit in members:
            return i
    raise AssertionError(f"{unit} is on no floor; add it to FLOORS here and to docs/ARCHITECTURE.md")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert cycles(graph()) == []


def test_every_arrow_points_down_a_floor():
    upward = []
    for src, targets in graph().items():
        for dst in targets:
            a, b = package(src), package(dst)
            if a != b and floor(b) >= floor(a):
                upward.append(f"{src} -> {dst} (floor {floor(a)} -> {floor(b)})")
    assert upward == []


def test_the_checks_catch_a_circle_and_an_upward_arrow():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert floor("malex.report") > floor("malex.metrics") > floor("malex.errors")
    with pytest.raises(AssertionError, match="on no floor"):
        floor("malex.nowhere")
    tree = graph()
    assert "malex.guard.io" in tree["malex.guard.guard"] or "malex.guard.io" in tree["malex.guard"]
    assert "malex.evaluate.study.runner" in tree["malex.cli"] or "malex.evaluate.study" in tree["malex.cli"]
