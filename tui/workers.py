"""Blocking work the app runs in Textual thread workers: opening storage, loading the model,
reading sessions. Plain functions and plain data; chatcore (torch), context and storage are
imported here lazily, inside the functions, so `import tui.app` stays light."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    """A message as the chat view shows it."""

    id: str
    role: str
    content: str
    status: str = "complete"
    in_context: bool = True
    pinned: bool = False


@dataclass(frozen=True)
class MeterInfo:
    used: int = 0
    window: int = 0
    pinned: int = 0
    summary: bool = False
    turns_out: int = 0
    ttft_s: float | None = None
    tok_s: float | None = None


def open_store(url: str | None) -> Any:
    import storage

    return storage.open_store(url)


def load_engine(model: str, progress: Callable[[int, int], None], max_seq_len: int | None = None,
                status: Callable[[str], None] | None = None) -> Any:
    import chatcore

    return chatcore.load(model or "demo", progress=progress, max_seq_len=max_seq_len, status=status)


@dataclass(frozen=True)
class SessionsPage:
    records: list[Any]
    next_offset: int | None  # None: no more sessions


def list_sessions(store: Any, offset: int = 0, limit: int = 200) -> SessionsPage:
    page = store.list_sessions(offset, limit)
    return SessionsPage(list(page.sessions), page.next_offset)


def search_sessions(store: Any, text: str, limit: int = 200) -> list[Any]:
    """Sessions whose title, tags or message text contain `text` (storage's bounded scan), as SearchHits."""
    return list(store.search(text, limit=limit))


def stored_rows(store: Any, session_id: str) -> tuple[Any, list[Row]]:
    """A session's record and its current branch straight from storage (before the model is ready)."""
    conv = store.load(session_id)
    pinned = set(conv.session.pinned)
    return conv.session, [Row(m.id, m.role, m.content, m.status, True, m.id in pinned) for m in conv.thread()]


def session_rows(session: Any) -> list[Row]:
    return [Row(m.id, m.role, m.content, m.status, m.in_context, m.pinned) for m in session.messages()]


def meter_info(session: Any, report: Any = None) -> MeterInfo:
    m = session.manager
    pinned, summary = len(m.pinned), m.summary is not None
    if report is not None:
        return MeterInfo(report.tokens_used, report.window, pinned, summary, report.turns_dropped,
                         report.ttft_s, report.decode_tok_s)
    try:
        plan = session.plan()
    except Exception:  # noqa: BLE001 - the meter is informative only
        return MeterInfo(0, session.window, pinned, summary, 0)
    return MeterInfo(plan.tokens, plan.window, pinned, summary, plan.turns_dropped)


def export_to(session: Any, fmt: str, directory: str) -> str:
    import os
    import re

    text = session.export(fmt)
    raw = session.store.get_session(session.id).title or "session"
    title = re.sub(r"[^A-Za-z0-9_-]+", "-", raw).strip("-")[:40] or "session"
    ext = "json" if fmt == "json" else "md"
    path = os.path.join(directory, f"chatcore-{title}-{session.id[-8:]}.{ext}")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def describe(exc: BaseException) -> str:
    """One line for a notice: the error's own message (ours are written for users)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def throttled(report: Callable[[int, int], None], interval: float = 1 / 15) -> Callable[[int, int], None]:
    """`report(done, total)` at most once per `interval` seconds, and always for the last step. The loader
    calls its progress hook once per tensor (272 times for the demo model); posting each one to the UI cost
    the event loop ~0.4 s of CPU, taken from the loader thread through the GIL."""
    last = -interval

    def hook(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if done >= total or now - last >= interval:
            last = now
            report(done, total)

    return hook


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
