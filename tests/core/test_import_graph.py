"""The dependency rules of the layout (README "Layout"), read from the source: no import cycle between the
modules of `instances`, and `snapshots` and `machines` never import `instances` (what they need of an
instance is passed in as arguments). Every import counts, also one inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APPS = ("agent", "dumont", "instances", "machines", "snapshots")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(app: str) -> dict[str, set[str]]:
    """{module of `app`: the project modules it imports} (a `from a import b` names `a.b` when b is a module)."""
    files = [p for p in (ROOT / app).rglob("*.py") if "migrations" not in p.parts]
    known = {_module(p) for other in APPS for p in (ROOT / other).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in files:
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                          for a in node.names}
        graph[_module(path)] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each group of modules that import each other, directly or around a loop (Tarjan's strongly
    connected components of two or more modules, or one that imports itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in graph:
                continue
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_modules_of_instances_import_each_other_without_a_cycle():
    graph = {name: {i for i in imported if i.startswith("instances")} for name, imported in imports_of("instances").items()}
    assert "instances.relaunch" in graph and graph["instances.tasks"]  # the walk sees the app
    assert cycles(graph) == []


@pytest.mark.parametrize("app", ["snapshots", "machines"])
def test_snapshots_and_machines_never_import_instances(app):
    offending = {name: sorted(i for i in imported if i == "instances" or i.startswith("instances."))
                 for name, imported in imports_of(app).items()}
    assert {name: found for name, found in offending.items() if found} == {}


def test_the_cycle_finder_finds_a_loop_and_only_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
