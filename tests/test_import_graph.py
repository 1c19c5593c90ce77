"""No import cycle inside ``chatcore/``: every ``import`` counts, at module level, under ``TYPE_CHECKING`` and
inside functions. The graph is read from the source with ``ast`` (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_graph(package: str = "chatcore") -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (``from a import b`` names module ``a.b`` if it is one)."""
    files = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path back to its start) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(v: str) -> None:   # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(graph, c) for c in components]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """The shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {w: [start, w] for w in sorted(graph[start] & component)}
    frontier = list(paths)
    while start not in paths:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    return paths[start]


def _shown(graph: dict[str, set[str]], found: list[list[str]]) -> str:
    """Each cycle, and every import between the modules of its component (what must go to break it)."""
    out = []
    for cycle in found:
        component = _component(graph, cycle[0])
        edges = [f"    {v} -> {w}" for v in sorted(component) for w in sorted(graph[v] & component)]
        out += [" -> ".join(cycle), "  imports among its modules:", *edges]
    return "\n".join(out)


def _component(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules that ``start`` reaches and that reach it back."""
    def reach(edges: dict[str, set[str]]) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for w in edges[todo.pop()] - seen:
                seen.add(w)
                todo.append(w)
        return seen

    back: dict[str, set[str]] = {v: set() for v in graph}
    for v, ws in graph.items():
        for w in ws:
            back[w].add(v)
    return reach(graph) & reach(back)


def test_the_graph_sees_imports_inside_functions_and_type_checking() -> None:
    graph = import_graph()
    assert "chatcore.parallel.launch" in graph["chatcore.loader"]        # inside load()
    assert "chatcore.engine" in graph["chatcore"]                        # under TYPE_CHECKING
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# the modules that read and describe model families: config, the family files, GGUF names and tensors
FAMILY_MODULES = ("chatcore.config", "chatcore.config_gguf", "chatcore.checkpoint_config", "chatcore.models",
                  "chatcore.weights")


def test_no_import_cycle_among_the_config_and_family_modules() -> None:
    graph = import_graph()
    mine = {m for m in graph if any(m == p or m.startswith(p + ".") for p in FAMILY_MODULES)}
    sub = {m: graph[m] & mine for m in mine}
    found = cycles(sub)
    assert not found, "import cycles:\n" + _shown(sub, found)


def test_no_import_cycle_inside_chatcore() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + _shown(graph, found)
