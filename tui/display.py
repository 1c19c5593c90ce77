"""What the widgets show, as plain frozen data built from the session API's records: `Row` (a message in the
chat view) and `MeterInfo` (the context meter); and the one-line text of an error notice."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
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
    branch: tuple[int, int] | None = None  # (position, count) among its alternatives, when it has any
    pending: bool = False  # not in storage yet (Redis unreachable); the session retries in the background


@dataclass(frozen=True)
class MeterInfo:
    used: int = 0
    window: int = 0
    pinned: int = 0
    summary: bool = False
    turns_out: int = 0
    ttft_s: float | None = None
    tok_s: float | None = None
    unsaved: int = 0  # messages of the session not in storage yet (retried in the background)


def rows(messages: Iterable[Any], branches: Mapping[str, tuple[int, int]] | None = None) -> list[Row]:
    """Rows for `context.ChatMessage`s (a live session's `messages()` or a stored one's), with `branches`
    (`ChatSession.branches()` / `SessionLibrary.branches(id)`) marking the messages that have alternatives."""
    at = branches or {}
    return [Row(m.id, m.role, m.content, m.status, m.in_context, m.pinned, at.get(m.id), getattr(m, "pending", False))
            for m in messages]


def session_rows(session: Any) -> list[Row]:
    """The rows of a live `ChatSession`'s current branch. While storage is unreachable the branch markers
    (read from storage) are left out; the messages, pending ones included, are in memory."""
    try:
        branches = session.branches()
    except Exception:  # noqa: BLE001 - e.g. StoreUnavailable: the thread is shown without its markers
        branches = {}
    return rows(session.messages(), branches)


def meter_info(session: Any, report: Any = None) -> MeterInfo:
    """The meter for a live `ChatSession`: from the turn's report when there is one, else from a plan of
    the current thread."""
    pinned, summary = len(session.pinned), session.summary is not None
    unsaved = len(getattr(session, "unsaved", ()))
    if report is not None:
        return MeterInfo(report.tokens_used, report.window, pinned, summary, report.turns_dropped,
                         report.ttft_s, report.decode_tok_s, unsaved)
    try:
        plan = session.plan()
    except Exception:  # noqa: BLE001 - the meter is informative only
        return MeterInfo(0, session.window, pinned, summary, 0, unsaved=unsaved)
    return MeterInfo(plan.tokens, plan.window, pinned, summary, plan.turns_dropped, unsaved=unsaved)


def export_name(title: str, session_id: str, fmt: str) -> str:
    """The file an export is written to: chatcore-<title>-<id tail>.json or .md."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", title or "session").strip("-")[:40] or "session"
    return f"chatcore-{slug}-{session_id[-8:]}.{'json' if fmt == 'json' else 'md'}"


def describe(exc: BaseException) -> str:
    """One line for a notice: the error's own message (ours are written for users)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
