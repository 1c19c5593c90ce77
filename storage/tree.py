"""Branch bookkeeping on plain ids: pure functions, no Redis, shared by the store and the tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def children_index(pairs: Iterable[tuple[str, str | None]]) -> dict[str | None, list[str]]:
    """Map parent id (None for roots) -> child ids, in the order `pairs` lists them."""
    out: dict[str | None, list[str]] = {}
    for mid, parent in pairs:
        out.setdefault(parent, []).append(mid)
    return out


def path_to(parents: Mapping[str, str | None], tip: str | None) -> list[str]:
    """Ids from the root down to `tip` (empty when `tip` is None). Raises ValueError on a cycle."""
    path: list[str] = []
    seen: set[str] = set()
    node = tip
    while node is not None:
        if node in seen:
            raise ValueError(f"parent links loop at message {node!r}")
        seen.add(node)
        path.append(node)
        node = parents[node]
    path.reverse()
    return path


def latest_leaf(children: Mapping[str | None, list[str]], start: str | None) -> str | None:
    """Follow the most recently added child from `start` until a leaf; `start` if it has none."""
    node = start
    while children.get(node):
        node = children[node][-1]
    return node


def subtree(children: Mapping[str | None, list[str]], root: str) -> list[str]:
    """`root` and all its descendants (pre-order)."""
    out: list[str] = []
    stack = [root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(reversed(children.get(node, [])))
    return out
