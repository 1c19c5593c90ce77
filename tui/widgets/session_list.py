"""The session list: most recent first, filtered by title as you type."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Label, ListItem, ListView

SHOWN = 100  # rows mounted at once (mounting is the slow part); the filter looks through every loaded session


class SessionItem(ListItem):
    def __init__(self, record: Any) -> None:
        super().__init__(Label(record.title or "(untitled)"), classes="session")
        self.record = record


class SessionList(Vertical):
    class Chosen(Message):
        def __init__(self, session_id: str) -> None:
            super().__init__()
            self.session_id = session_id

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.records: list[Any] = []
        self.current: str | None = None
        self.loaded = False  # set once the first list of sessions is on screen

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter sessions", id="filter")
        yield ListView(id="sessions")

    @property
    def filter_text(self) -> str:
        return self.query_one("#filter", Input).value.strip().lower()

    async def set_records(self, records: list[Any], current: str | None = None) -> None:
        self.records = list(records)
        if current is not None:
            self.current = current
        await self.refresh_items()
        self.loaded = True

    async def refresh_items(self) -> None:
        lv = self.query_one(ListView)
        text = self.filter_text
        shown = [r for r in self.records if not text or text in (r.title or "").lower()][:SHOWN]
        await lv.clear()
        await lv.extend([SessionItem(r) for r in shown])
        for i, r in enumerate(shown):
            if r.id == self.current:
                lv.index = i
                break

    async def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        await self.refresh_items()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.query_one(ListView).focus()

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        event.stop()
        if isinstance(event.item, SessionItem):
            self.post_message(self.Chosen(event.item.record.id))
