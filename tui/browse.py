"""The app's session list and session opening: the sidebar's pages and search, and showing a session (from
storage at once, as a live `ChatSession` once the model is ready) with its "not saved yet" marks. A mixin of
`ChatApp`, which owns the state these read and write (`library`, `engine`, `session`, `session_id`, ...)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

from textual import work

from context import ChatSession, SessionLibrary

from .actions import STREAMING
from .display import MeterInfo, Row, meter_info, rows, session_rows
from .messages import SavesChanged
from .widgets.meter import ContextMeter
from .widgets.session_list import PAGE as SESSIONS_PAGE
from .widgets.session_list import SessionList


class Browsing:
    # -- the session list -----------------------------------------------------------------------------
    def refresh_sessions(self, open_first: bool = False) -> None:
        """Fill the sidebar with the first page of sessions; with `open_first`, open the session asked for
        (else the most recent) before the sidebar fills."""
        if self.library is not None:
            self._fetch_sessions(self.library, open_first)

    @work(thread=True, group="sessions", exit_on_error=False)
    def _fetch_sessions(self, library: SessionLibrary, open_first: bool) -> None:
        """Thread: which session to open (at start-up), then the first page of sessions."""
        if open_first and self.session_id is not None:
            try:
                self.session_id = library.resolve(self.session_id)
            except Exception as exc:  # noqa: BLE001 - e.g. no such session: the most recent opens instead
                self.session_id = None
                self.call_from_thread(self.show_error, exc)
        try:
            page = library.page(0, SESSIONS_PAGE)
        except Exception as exc:  # noqa: BLE001
            self.call_from_thread(self._sessions_failed, exc)
            return
        self.call_from_thread(self._sessions_fetched, page, open_first)

    def _sessions_fetched(self, page: Any, open_first: bool) -> None:
        if not open_first:
            self._fill_sidebar(page)
            return
        if self.session_id is None and page.sessions:
            self.session_id = page.sessions[0].id
        if self.session_id is not None:
            # The session's messages first; the sidebar fills once they are on screen.
            self.open_session(self.session_id, after=partial(self._fill_sidebar, page))
        else:
            self._fill_sidebar(page)
            self._flush_pending()

    def _sessions_failed(self, exc: BaseException) -> None:
        self.show_error(exc)
        self.call_after_refresh(self._settled)

    def _fill_sidebar(self, page: Any) -> None:
        self.query_one(SessionList).set_records(page.sessions, self.session_id, has_more=page.next_offset is not None)
        self.call_after_refresh(self._settled)

    def _settled(self) -> None:
        """The first screen (session and sidebar) is painted: the model load may start."""
        self.mark("sidebar_shown")
        self.ui_settled.set()

    def on_session_list_more_wanted(self, msg: SessionList.MoreWanted) -> None:
        library, sidebar = self.library, self.query_one(SessionList)
        if library is None:
            return
        self.bg(lambda: library.page(msg.loaded, SESSIONS_PAGE),
                lambda page: sidebar.set_records(page.sessions, has_more=page.next_offset is not None, append=True))

    def on_session_list_search(self, msg: SessionList.Search) -> None:
        library, sidebar = self.library, self.query_one(SessionList)
        if library is None:
            return
        self.bg(lambda: library.search(msg.text, SESSIONS_PAGE), lambda hits: sidebar.show_hits(msg.text, hits))

    def on_session_list_chosen(self, msg: SessionList.Chosen) -> None:
        if msg.session_id == self.session_id and self.session is not None:
            self.prompt.focus()
            return
        if self.streaming:
            self.notify(STREAMING, severity="warning")
            return
        self.open_session(msg.session_id)
        self.prompt.focus()

    # -- opening a session ----------------------------------------------------------------------------
    def open_session(self, session_id: str, after: Callable[[], Any] | None = None) -> None:
        """Show a session: from storage at once; as a live ChatSession when the model is ready.

        ``after`` runs once the session is on screen, painted (or could not be shown)."""
        if self.library is None:
            return
        self.session_id = session_id
        self.query_one(SessionList).current = session_id
        self._read_session(self.library, self.engine, session_id, after)

    @work(thread=True, group="open", exit_on_error=False)
    def _read_session(self, library: SessionLibrary, engine: Any, session_id: str,
                      after: Callable[[], Any] | None) -> None:
        """Thread: the session as stored (no engine yet) or live, handed to `_session_read`."""
        try:
            if engine is None:
                shown = rows(*library.view(session_id))
                session, info = None, MeterInfo()
            else:
                session = self._live_session(library, engine, session_id)
                shown, info = session_rows(session), meter_info(session)
        except Exception as exc:  # noqa: BLE001
            self.call_from_thread(self._session_failed, exc, after)
            return
        self.call_from_thread(self._session_read, session_id, session, shown, info, after)

    def _live_session(self, library: SessionLibrary, engine: Any, session_id: str) -> ChatSession:
        """Thread: the open ChatSession of `session_id` (opened once, then kept with its KV slot)."""
        s = self.sessions.get(session_id)
        if s is None:
            s = self.sessions[session_id] = library.session(engine, session_id, window=self.window, pool=self.pool)
            self._watch_saves(s)
        return s

    def _watch_saves(self, session: ChatSession) -> None:
        """Hear (from any thread) when the session's unsaved messages change: kept while storage is
        unreachable, then written by its background retry."""
        sid = session.id
        session.on_save(lambda event: self.post_message(SavesChanged(sid, event)))

    def on_saves_changed(self, msg: SavesChanged) -> None:
        """Show the change: the "not saved yet" markers and the meter's count, and a notice once all is stored."""
        event = msg.event
        if event.dropped:
            self.notify(f"{len(event.dropped)} message(s) could not be stored (the session changed meanwhile) "
                        "and are shown until you leave it.", severity="warning", timeout=10)
        if event.saved and not event.pending:
            self.notify("Storage is back: the messages kept meanwhile are saved.")
        session = self.session
        if session is None or msg.session_id != session.id:
            return
        meter = self.query_one(ContextMeter)
        meter.set_info(dataclasses.replace(meter.info, unsaved=len(event.pending)))
        if self.streaming:
            self._reshow_after_turn = True  # the turn's end shows the thread as it is then
            return
        self.bg(lambda: session_rows(session), partial(self._reshow, session.id), on_error=lambda exc: None)

    async def _reshow(self, session_id: str, shown: list[Row]) -> None:
        if session_id == self.session_id and not self.streaming:
            await self.view.show(shown)

    async def _session_read(self, session_id: str, session: ChatSession | None, shown: list[Row], info: MeterInfo,
                            after: Callable[[], Any] | None) -> None:
        try:
            await self._show_session(session_id, session, shown, info)
        finally:
            if after is not None:
                self.call_after_refresh(after)

    async def _show_session(self, session_id: str, session: ChatSession | None, shown: list[Row],
                            info: MeterInfo) -> None:
        if self.session_id != session_id:
            return  # another session was chosen meanwhile
        if session is None and self.session is not None and self.session.id == session_id:
            return  # the live session was shown first
        self.session = session
        self.view.clear_selection()
        await self.view.show(shown)
        self.query_one(ContextMeter).set_info(info)
        self.mark_painted("session_shown")
        if session is not None:
            self.mark_painted("live_session_shown")
            self.live_shown = session_id
            self._flush_pending()

    def _session_failed(self, exc: BaseException, after: Callable[[], Any] | None) -> None:
        self.show_error(exc)
        if after is not None:
            self.call_later(after)

    def _adopt(self, session: ChatSession) -> None:
        self.session, self.session_id = session, session.id
        self.query_one(SessionList).current = session.id
