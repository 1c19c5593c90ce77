"""Messages the background workers post to the app (thread-safe `post_message`)."""

from __future__ import annotations

from typing import Any

from textual.message import Message


class StoreReady(Message):
    def __init__(self, store: Any) -> None:
        super().__init__()
        self.store = store


class ModelProgress(Message):
    def __init__(self, done: int, total: int, stage: str) -> None:
        super().__init__()
        self.done, self.total, self.stage = done, total, stage


class ModelReady(Message):
    def __init__(self, engine: Any, seconds: float) -> None:
        super().__init__()
        self.engine, self.seconds = engine, seconds


class LoadFailed(Message):
    """`what` is "model" or "storage"."""

    def __init__(self, what: str, error: BaseException) -> None:
        super().__init__()
        self.what, self.error = what, error
