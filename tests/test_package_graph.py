"""The product packages import each other without loops, and the layering the README shows holds.

Every import statement counts, including those inside functions (a deferred import is still a dependency):
the test parses the sources, it does not import them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "tasks", "rewards", "learner", "actors", "cluster")
# What each package may import of the others (the README's package graph); rewards reach only the image helpers
# and the shapes world, so the reward plane can be borrowed without the trainer.
ALLOWED = {
    "models": set(),
    "tasks": {"models"},
    "rewards": {"models.images", "tasks.shapes.world"},
    "learner": {"models"},
    "actors": {"models", "learner"},
    "cluster": {"models", "tasks", "rewards", "learner", "actors"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The product modules that ``path`` imports (``from a.b import c`` counts a.b.c when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            ]
        else:
            continue
        out |= {n for n in names if n in modules}
    return out


def graph() -> dict[str, set[str]]:
    modules = product_modules()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each a loop of imports."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    top = lambda m: m.split(".")[0]  # noqa: E731
    out: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for m, deps in edges.items():
        out[top(m)] |= {top(d) for d in deps if top(d) != top(m)}
    return out


def test_the_cycle_finder_finds_a_planted_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back():
    assert cycles(graph()) == []


def test_no_package_imports_itself_back():
    assert cycles(package_graph(graph())) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_the_layering_allows(package):
    allowed = ALLOWED[package]
    bad = sorted(
        f"{m} -> {d}"
        for m, deps in graph().items()
        if m.split(".")[0] == package
        for d in deps
        if d.split(".")[0] != package and not any(d == a or d.startswith(a + ".") for a in allowed)
    )
    assert bad == []


def test_the_graph_sees_deferred_imports():
    edges = graph()
    assert "models.tiny" in edges["models.adapter"]  # imported inside SD3Adapter.tiny
    assert "tasks.shapes.model" in edges["cluster.build"]  # imported inside build_model
