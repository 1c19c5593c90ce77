"""Messages the background workers post to the app (thread-safe `post_message`), and `throttled`, which
keeps the model load's progress from flooding the app with them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from textual.message import Message


class StoreReady(Message):
    """Storage is open: `library` is a `context.SessionLibrary`."""

    def __init__(self, library: Any) -> None:
        super().__init__()
        self.library = library


class ModelProgress(Message):
    def __init__(self, done: int, total: int, stage: str) -> None:
        super().__init__()
        self.done, self.total, self.stage = done, total, stage


class ModelReady(Message):
    def __init__(self, engine: Any, seconds: float) -> None:
        super().__init__()
        self.engine, self.seconds = engine, seconds


class SavesChanged(Message):
    """A live session's unsaved messages changed (`event`: a `context.SaveEvent`), posted from the thread
    that changed them (the session's background retry, or a turn's)."""

    def __init__(self, session_id: str, event: Any) -> None:
        super().__init__()
        self.session_id, self.event = session_id, event


class LoadFailed(Message):
    """`what` is "model" or "storage"."""

    def __init__(self, what: str, error: BaseException) -> None:
        super().__init__()
        self.what, self.error = what, error


def throttled(report: Callable[[int, int], None], interval: float = 1 / 15) -> Callable[[int, int], None]:
    """`report(done, total)` at most once per `interval` seconds, and always for the last step. The loader
    calls its progress hook once per tensor (hundreds of times); posting each one would busy the event loop,
    and through the GIL slow the load itself (bench/tui.py measures the start-up)."""
    last = -interval

    def hook(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if done >= total or now - last >= interval:
            last = now
            report(done, total)

    return hook
