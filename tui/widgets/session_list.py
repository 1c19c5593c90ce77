"""The session list: most recent first, a page at a time, filtered as you type.

One OptionList holds the rows (a single widget that draws only the visible lines, so a page of hundreds of
sessions costs about as much to show as a page of ten). Typing in the filter narrows the loaded sessions by
title at once and asks the app (`Search`, after a short pause in typing) to search storage: titles, tags and
message text of every session. Hits found in a message show a snippet under the title.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Input, OptionList
from textual.widgets.option_list import Option

PAGE = 200  # sessions fetched per page; a "more" row at the end fetches the next one
MORE = "\x00more"  # option id of that row
SEARCH_DELAY = 0.25  # seconds of no typing before storage is searched


class SessionList(Vertical):
    class Chosen(Message):
        def __init__(self, session_id: str) -> None:
            super().__init__()
            self.session_id = session_id

    class MoreWanted(Message):
        """The user asked for the next page of sessions (there are `loaded` so far)."""

        def __init__(self, loaded: int) -> None:
            super().__init__()
            self.loaded = loaded

    class Search(Message):
        """Search storage for `text` (titles, tags and message text); answer with `show_hits`."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.records: list[Any] = []
        self.has_more = False
        self._current: str | None = None
        self.loaded = False  # set once the first list of sessions is on screen
        self.hits: tuple[str, list[Any]] | None = None  # (filter text, storage search hits) for that text
        self._search_timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter sessions", id="filter")
        yield OptionList(id="sessions")

    @property
    def current(self) -> str | None:
        """The open session (highlighted when listed)."""
        return self._current

    @current.setter
    def current(self, session_id: str | None) -> None:
        self._current = session_id
        ids = [o.id for o in self.option_list.options]
        if session_id in ids:
            self.option_list.highlighted = ids.index(session_id)

    @property
    def filter_text(self) -> str:
        return self.query_one("#filter", Input).value.strip()

    @property
    def option_list(self) -> OptionList:
        return self.query_one("#sessions", OptionList)

    def title_of(self, session_id: str | None) -> str:
        found = [*self.records, *(h.session for h in (self.hits[1] if self.hits else []))]
        return next((r.title for r in found if r.id == session_id), "")

    def shown_ids(self) -> list[str]:
        return [o.id for o in self.option_list.options if o.id and o.id != MORE]

    def set_records(self, records: Sequence[Any], current: str | None = None, has_more: bool = False,
                    append: bool = False) -> None:
        self.records = [*self.records, *records] if append else list(records)
        self.has_more = has_more
        if current is not None:
            self.current = current
        self.refresh_items()
        self.loaded = True
        if self.filter_text:  # the list changed under an active filter: search again
            self.post_message(self.Search(self.filter_text))

    def show_hits(self, text: str, hits: Sequence[Any]) -> None:
        """Storage's answer for `text`; dropped if the filter has changed since."""
        if text == self.filter_text:
            self.hits = (text, list(hits))
            self.refresh_items()

    def refresh_items(self) -> None:
        text = self.filter_text
        options: list[Option] = []
        if not text:
            options = [_option(r) for r in self.records]
            if self.has_more:
                options.append(Option(Text("… more sessions", style="italic"), id=MORE))
        elif self.hits is not None and self.hits[0] == text:
            options = [_option(h.session, _near(h.snippet, text) if h.message_id else None) for h in self.hits[1]]
        else:  # until storage answers: the loaded sessions whose title matches
            low = text.casefold()
            options = [_option(r) for r in self.records if low in (r.title or "").casefold()]
        self.option_list.set_options(options)
        self.current = self._current  # highlight it again

    async def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.refresh_items()
        if self._search_timer is not None:
            self._search_timer.stop()
            self._search_timer = None
        text = self.filter_text
        if text:
            self._search_timer = self.set_timer(SEARCH_DELAY, lambda: self.post_message(self.Search(text)))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.option_list.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id == MORE:
            self.post_message(self.MoreWanted(len(self.records)))
        elif event.option.id:
            self.post_message(self.Chosen(event.option.id))


def _near(snippet: str, text: str, before: int = 8) -> str:
    """The snippet from a few characters before the match, so a narrow sidebar still shows the match."""
    at = snippet.casefold().find(text.casefold())
    return "…" + snippet[at - before:].lstrip("…") if at > before + 1 else snippet


def _option(record: Any, snippet: str | None = None) -> Option:
    title = Text(record.title or "(untitled)", no_wrap=True, overflow="ellipsis")
    if snippet:
        title.append("\n")
        title.append(snippet, style="dim italic")
    return Option(title, id=record.id)
