"""Work counted instead of timed: how many lines of our own Python a call runs (a per-element loop runs at least
one per element; a call that hands the elements to C runs a handful). Speed itself is measured in bench/."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def lines_run(fn: Callable[[], Any], *packages: str) -> tuple[Any, int]:
    """`fn()`'s result and how many line events it ran in files under REPO/<package> (this thread only)."""
    roots = tuple(str(REPO / p) for p in packages)
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def global_(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(roots) else None

    previous = sys.gettrace()
    sys.settrace(global_)
    try:
        result = fn()
    finally:
        sys.settrace(previous)
    return result, count
