"""The layers of shared/DESIGN.md hold: no import cycles between featx's modules, and every import-linter
contract in pyproject.toml is kept (so a broken contract fails the suite even when pytest runs alone).

Imports inside functions and under ``TYPE_CHECKING`` count: they are dependencies all the same.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("operators", "pipelines")


def import_cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """One cycle (``a -> b -> ... -> a``) per strongly connected group of ``modules``, sorted."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & modules) for m in sorted(modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for root, imported in edges.items():  # Tarjan's algorithm, iterative
        if root in index:
            continue
        work = [(root, iter(imported))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        group.add(m)
                        if m == node:
                            break
                    if len(group) > 1:
                        groups.append(group)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    cycles = []
    for group in groups:
        start = min(group)
        step = next(m for m in edges[start] if m in group)
        chain = graph.find_shortest_chain(importer=step, imported=start) or (step, start)
        cycles.append([start, *chain])
    return sorted(cycles)


def test_no_import_cycles_between_modules() -> None:
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    modules = {m for m in graph.modules if m.split(".")[0] in PACKAGES}
    cycles = import_cycles(graph, modules)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_import_cycles_are_found() -> None:
    """The check itself: a cycle added to a graph is reported, from its first module round to it."""
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert import_cycles(graph, {"p.a", "p.b", "p.c", "p.d"}) == [["p.a", "p.b", "p.c", "p.a"]]


def test_import_linter_contracts_are_kept() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    res = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
