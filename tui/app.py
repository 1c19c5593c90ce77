"""`chatcore chat`: the Textual app. It paints at once; storage opens and the model loads (torch
imported) in a background thread worker, with progress shown; typing works meanwhile. Generation
runs in a thread worker draining the session's event stream; widgets change only through
`call_from_thread` and posted messages."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Header, Label, ProgressBar

from . import keymap
from .actions import Actions
from .messages import LoadFailed, ModelProgress, ModelReady, StoreReady
from .styles import CSS
from .widgets.chat_view import ChatView
from .widgets.meter import ContextMeter
from .widgets.prompt import PromptInput
from .widgets.session_list import PAGE as SESSIONS_PAGE
from .widgets.session_list import SessionList
from .workers import (
    MeterInfo,
    Row,
    SessionsPage,
    Stopwatch,
    describe,
    list_sessions,
    load_engine,
    meter_info,
    open_store,
    search_sessions,
    session_rows,
    stored_rows,
    throttled,
)


class ChatApp(Actions, App[None]):
    CSS = CSS
    TITLE = "chatcore"
    BINDINGS = keymap.bindings()

    def __init__(self, model: str = "demo", *, redis_url: str | None = None, session_id: str | None = None,
                 engine: Any = None, store: Any = None, keys: dict[str, str] | None = None, timings: bool = True,
                 sampling: dict[str, Any] | None = None, export_dir: str | None = None,
                 max_seq_len: int | None = None, window: int | None = None) -> None:
        super().__init__()
        self.model_path, self.redis_url, self.max_seq_len, self.window = model, redis_url, max_seq_len, window
        self.session_id = session_id
        self.engine: Any = None
        self._given_engine, self.store, self._own_store = engine, store, store is None
        self.keys = dict(keys or {})
        self.timings = timings
        self.sampling = dict(sampling or {})
        self.export_dir = export_dir or os.getcwd()
        self.session: Any = None
        self.sessions: dict[str, Any] = {}
        self.pool: Any = None
        self.pending: list[str] = []
        self.busy = False
        self.load_state = "loading"  # loading | ready | failed
        self.store_state = "opening" if store is None else "ready"  # opening | ready | failed
        self.load_seconds: float | None = None
        self.turns = 0  # turns finished or refused (tests wait on it)
        self.live_shown: str | None = None  # the session last shown live (KV-ready), meter included
        # Set once the first session and the sidebar are on screen (or there is nothing to show): the model
        # load waits for it (3 s at most), so torch's start-up does not compete with the first screen.
        self.ui_settled = threading.Event()
        self.clipboard_file = keymap.config_dir() / "clipboard.txt"
        # Start-up timeline: seconds from this object's creation to each first event (bench/tui.py reads it).
        self._t0 = time.perf_counter()
        self.timeline: dict[str, float] = {}

    def mark(self, event: str) -> None:
        """Record the first time `event` happens (seconds since the app object was made)."""
        self.timeline.setdefault(event, time.perf_counter() - self._t0)

    def mark_painted(self, event: str) -> None:
        """Mark `event` once the screen has been refreshed after what was just done."""
        self.call_after_refresh(self.mark, event)

    # -- layout -------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Horizontal(id="main"):
            yield SessionList(id="sidebar")
            with Vertical(id="chat"):
                yield ChatView(id="view")
                with Horizontal(id="status"):
                    yield Label("loading model…", id="load-label")
                    yield ProgressBar(id="load-bar", show_eta=False)
                yield ContextMeter(timings=self.timings, id="meter")
                yield PromptInput("Message (Enter to send · ctrl+j new line · F1 help · ctrl+p commands)", id="prompt")
        yield Footer()

    @property
    def view(self) -> ChatView:
        return self.query_one(ChatView)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one("#prompt", PromptInput)

    def on_mount(self) -> None:
        if self.keys:
            self.set_keymap(keymap.textual_keymap(self.keys))
        self.prompt.focus()
        self.mark_painted("first_paint")
        self.call_after_refresh(self.run_worker, self._boot, thread=True, group="boot", exit_on_error=False)

    # -- background -----------------------------------------------------------------------------------
    def _boot(self) -> None:
        """Thread: open storage, then import chatcore (torch) and load the model."""
        if self.store is None:
            try:
                self.post_message(StoreReady(open_store(self.redis_url)))
            except Exception as exc:  # noqa: BLE001 - shown as a notice; the app keeps running
                self.post_message(LoadFailed("storage", exc))
                self.ui_settled.set()  # nothing to show: load the model now
        else:
            self.post_message(StoreReady(self.store))
        self.ui_settled.wait(timeout=3.0)
        self.mark("model_load_start")
        sw = Stopwatch()
        try:
            engine = self._given_engine
            if engine is None:
                progress = throttled(lambda d, t: self.post_message(ModelProgress(d, t, "loading")))
                engine = load_engine(self.model_path, progress, self.max_seq_len,
                                     status=lambda text: self.call_from_thread(self.notify, text, timeout=8))
            from context import SlotPool

            self.pool = SlotPool(engine.new_slot)
        except BaseException as exc:  # noqa: BLE001
            self.post_message(LoadFailed("model", exc))
            return
        self.post_message(ModelReady(engine, sw()))

    def bg(self, fn: Callable[[], Any], then: Callable[[Any], Any] | None = None,
           on_error: Callable[[BaseException], Any] | None = None) -> None:
        """Run `fn` in a thread worker; hand its result to `then` (or its error to `on_error`) on the UI."""
        def run() -> None:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001
                self.call_from_thread(on_error or self.show_error, exc)
                return
            if then is not None:
                self.call_from_thread(then, result)
        self.run_worker(run, thread=True, group="bg", exit_on_error=False)

    def show_error(self, exc: BaseException, title: str = "Error") -> None:
        self.notify(describe(exc), title=title, severity="error", timeout=10)

    # -- loading ------------------------------------------------------------------------------------
    def on_store_ready(self, msg: StoreReady) -> None:
        self.store, self.store_state = msg.store, "ready"
        self.mark("store_ready")
        self.refresh_sessions(open_first=True)

    def on_model_progress(self, msg: ModelProgress) -> None:
        self.query_one("#load-bar", ProgressBar).update(total=msg.total, progress=msg.done)

    async def on_model_ready(self, msg: ModelReady) -> None:
        self.engine, self.load_seconds, self.load_state = msg.engine, msg.seconds, "ready"
        self.mark("model_ready")
        name = Path(str(getattr(msg.engine, "source", "") or self.model_path)).name
        self.sub_title = name
        self.query_one("#status").add_class("-done")
        if self.session_id is not None and self.store is not None:
            self.open_session(self.session_id)
        elif self.pending:
            self._flush_pending()

    def on_load_failed(self, msg: LoadFailed) -> None:
        if msg.what == "model":
            self.load_state = "failed"
            self.query_one("#load-label", Label).update(f"model failed to load: {describe(msg.error)}")
            self.query_one("#load-bar").display = False
            self.show_error(msg.error, "Model failed to load")
            if self.pending:
                self._restore("\n".join(self.pending))
                self.pending.clear()
        else:
            self.store_state = "failed"
            self.show_error(msg.error, "Storage unavailable")
            if self.pending:
                self._restore("\n".join(self.pending))
                self.pending.clear()

    def _flush_pending(self) -> None:
        if self.pending and not self.busy and self.engine is not None and self.store is not None:
            text = "\n\n".join(self.pending)
            self.pending.clear()
            self.start_turn("send", text)

    # -- sessions -----------------------------------------------------------------------------------
    def refresh_sessions(self, open_first: bool = False) -> None:
        store = self.store
        sidebar = self.query_one(SessionList)

        def fill(page: SessionsPage) -> None:
            sidebar.set_records(page.records, self.session_id, has_more=page.next_offset is not None)
            self.call_after_refresh(self._settled)

        def got(page: SessionsPage) -> None:
            if not open_first:
                fill(page)
                return
            if self.session_id is None and page.records:
                self.session_id = page.records[0].id
            if self.session_id is not None:
                # The session's messages first; the sidebar fills once they are on screen.
                self.open_session(self.session_id, after=lambda: fill(page))
            else:
                fill(page)
                self._flush_pending()

        def fetch() -> SessionsPage:
            if open_first and self.session_id is not None:
                matches = store.match_session_ids(self.session_id)
                if len(matches) == 1:
                    self.session_id = matches[0]
                elif not store.session_exists(self.session_id):
                    from storage import NotFound

                    missing, self.session_id = self.session_id, None
                    raise NotFound(f"no session {missing!r}; starting a new one")
            return list_sessions(store, 0, SESSIONS_PAGE)

        def failed(exc: BaseException) -> None:
            self.show_error(exc)
            if open_first:
                self.refresh_sessions(open_first=True)

        self.bg(fetch, got, failed)

    def _settled(self) -> None:
        """The first screen (session and sidebar) is painted: the model load may start."""
        self.mark("sidebar_shown")
        self.ui_settled.set()

    def on_session_list_more_wanted(self, msg: SessionList.MoreWanted) -> None:
        store, sidebar = self.store, self.query_one(SessionList)
        if store is None:
            return
        self.bg(lambda: list_sessions(store, msg.loaded, SESSIONS_PAGE),
                lambda page: sidebar.set_records(page.records, has_more=page.next_offset is not None, append=True))

    def on_session_list_search(self, msg: SessionList.Search) -> None:
        store, sidebar = self.store, self.query_one(SessionList)
        if store is None:
            return
        self.bg(lambda: search_sessions(store, msg.text, SESSIONS_PAGE), lambda hits: sidebar.show_hits(msg.text, hits))

    def open_session(self, session_id: str, after: Callable[[], Any] | None = None) -> None:
        """Show a session: from storage at once; as a live ChatSession when the model is ready.

        ``after`` runs once the session is on screen, painted (or could not be shown)."""
        if self.store is None:
            return
        self.session_id = session_id
        self.query_one(SessionList).current = session_id
        store, engine = self.store, self.engine

        def load() -> tuple[Any, list[Row], MeterInfo]:
            if engine is None:
                record, rows = stored_rows(store, session_id)
                return None, rows, MeterInfo()
            from context import ChatSession

            s = self.sessions.get(session_id)
            if s is None:
                s = self.sessions[session_id] = ChatSession.open(engine, store, session_id, window=self.window,
                                                                 pool=self.pool)
            return s, session_rows(s), meter_info(s)

        async def show(result: tuple[Any, list[Row], MeterInfo]) -> None:
            try:
                await _show(result)
            finally:
                if after is not None:
                    self.call_after_refresh(after)

        async def _show(result: tuple[Any, list[Row], MeterInfo]) -> None:
            session, rows, info = result
            if self.session_id != session_id:
                return
            if session is None and self.session is not None and self.session.id == session_id:
                return  # the live session was shown first
            self.session = session
            self.view.clear_selection()
            await self.view.show(rows)
            self.query_one(ContextMeter).set_info(info)
            self.mark_painted("session_shown")
            if session is not None:
                self.mark_painted("live_session_shown")
                self.live_shown = session_id
                self._flush_pending()

        def failed(exc: BaseException) -> None:
            self.show_error(exc)
            if after is not None:
                self.call_later(after)

        self.bg(load, show, failed)

    def _new_session_sync(self, title: str = "", system: str | None = None) -> Any:
        from context import ChatSession

        s = ChatSession.create(self.engine, self.store, title=title, system=system, window=self.window,
                               pool=self.pool, **self.sampling)
        self.sessions[s.id] = s
        return s

    def _adopt(self, session: Any) -> None:
        self.session, self.session_id = session, session.id
        self.query_one(SessionList).current = session.id

    async def on_session_list_chosen(self, msg: SessionList.Chosen) -> None:
        if msg.session_id == self.session_id and self.session is not None:
            self.prompt.focus()
            return
        if self.busy:
            self.notify("A reply is still streaming; press Esc to cancel it first.", severity="warning")
            return
        self.open_session(msg.session_id)
        self.prompt.focus()

    # -- turns --------------------------------------------------------------------------------------
    def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.busy:
            self.notify("A reply is still streaming; press Esc to cancel it.", severity="warning")
            return
        if self.store_state == "failed":
            self.notify("Storage is not available, so the message cannot be saved; it stays in the input.",
                        severity="error")
            return
        if self.load_state == "failed":
            self.notify("The model failed to load; restart with --model PATH. Your text stays in the input.",
                        severity="error")
            return
        event.prompt.value = ""
        if self.engine is None or self.store is None or (self.session is None and self.session_id is not None):
            self.pending.append(text)
            self.notify("Still starting; your message will be sent when the model is ready.")
            return
        self.start_turn("send", text)

    def _restore(self, text: str) -> None:
        current = self.prompt.value
        self.prompt.value = text if not current.strip() else f"{text}\n{current}"

    def start_turn(self, op: str, text: str | None = None, message_id: str | None = None) -> None:
        if self.busy:
            self.notify("A reply is still streaming; press Esc to cancel it.", severity="warning")
            if op == "send" and text:
                self._restore(text)
            return
        self.busy = True
        self.run_worker(partial(self._turn, op, text, message_id), thread=True, group="turn", exit_on_error=False)

    def _turn(self, op: str, text: str | None, message_id: str | None) -> None:
        """Thread: store the message, then drain the reply stream into the view."""
        session = self.session
        try:
            if session is None:
                session = self._new_session_sync(title=(text or "")[:48])
                self.call_from_thread(self._adopt, session)
            if op == "send":
                gen = session.send(text)
            elif op == "edit":
                gen = session.edit(message_id, text)
            else:
                gen = session.regenerate()
            rows = session_rows(session)
            if op == "regenerate" and rows and rows[-1].role == "assistant":
                rows = rows[:-1]
        except Exception as exc:  # noqa: BLE001
            self.call_from_thread(self._turn_failed, op, text, exc)
            return
        self.call_from_thread(self._turn_started, rows)
        last = None
        try:
            for ev in gen:
                if ev.text:
                    self.call_from_thread(self.view.write_reply, ev.message_id, ev.text)
                last = ev
        except Exception as exc:  # noqa: BLE001
            self.call_from_thread(self.show_error, exc, "Generation failed")
        rows = session_rows(session)
        info = meter_info(session, last.report if last is not None else None)
        self.call_from_thread(self._turn_done, session.id, rows, info, last.finish_reason if last else None)

    def _turn_failed(self, op: str, text: str | None, exc: BaseException) -> None:
        self.busy = False
        self.turns += 1
        if op == "send" and text:
            self._restore(text)
        self.show_error(exc, "Message not sent" if op == "send" else "Failed")

    async def _turn_started(self, rows: list[Row]) -> None:
        await self.view.show(rows)
        await self.view.start_reply()

    async def _turn_done(self, session_id: str, rows: list[Row], info: MeterInfo, finish: str | None) -> None:
        self.busy = False
        self.turns += 1
        if session_id == self.session_id:
            await self.view.show(rows)
            self.query_one(ContextMeter).set_info(info)
        if finish == "cancelled":
            self.notify("Reply cancelled; the partial text is kept.")
        self.refresh_sessions()
        self._flush_pending()

    def on_unmount(self) -> None:
        if self._own_store and self.store is not None:
            self.store.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="chatcore chat", description="The terminal chat UI.")
    ap.add_argument("--model", "-m", default="demo", help="model directory, .gguf file, or 'demo' (default)")
    ap.add_argument("--redis-url", default=None, help="Redis URL (default: $REDIS_URL, else the embedded Redis)")
    ap.add_argument("--session", default=None, help="open this session (an id or a unique prefix)")
    ap.add_argument("--max-seq-len", type=int, default=None, help="context window to use (default: the model's)")
    ap.add_argument("--keymap", type=Path, default=None, help="key bindings file (default: keymap.toml in the "
                                                                "config directory)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        keys = keymap.load_keymap(args.keymap)
    except (OSError, ValueError) as exc:
        print(f"chatcore: error: {exc}", file=sys.stderr)
        return 2
    ChatApp(args.model, redis_url=args.redis_url, session_id=args.session, keys=keys,
            max_seq_len=args.max_seq_len).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
