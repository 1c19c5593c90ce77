"""`chatcore chat`: the Textual app. It paints at once; storage opens and the model loads (torch
imported) in a background thread worker, with progress shown; typing works meanwhile. Generation
runs in a thread worker draining the session's event stream; widgets change only through
`call_from_thread` and posted messages. The app drives context's API only: a `SessionLibrary` for the
stored sessions, a `ChatSession` for the open one."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.widgets import Footer, Header, Label, ProgressBar

from context import ChatSession, MessageTooLong, SessionLibrary, SlotPool, load_engine

from . import keymap
from .actions import STREAMING, Actions
from .display import MeterInfo, Row, describe, meter_info, rows, session_rows
from .messages import LoadFailed, ModelProgress, ModelReady, SavesChanged, StoreReady, throttled
from .styles import CSS
from .widgets.chat_view import ChatView
from .widgets.meter import ContextMeter
from .widgets.prompt import PromptInput
from .widgets.session_list import PAGE as SESSIONS_PAGE
from .widgets.session_list import SessionList


class ChatApp(Actions, App[None]):
    CSS = CSS
    TITLE = "chatcore"
    BINDINGS = keymap.bindings()

    # The state the actions depend on; a change re-checks which are enabled (`Actions.check_action`).
    streaming: reactive[bool] = reactive(False, bindings=True)  # a reply is streaming
    load_state: reactive[str] = reactive("loading", bindings=True)  # the model: loading | ready | failed
    session: reactive[ChatSession | None] = reactive(None, bindings=True)  # the live session shown

    def __init__(self, model: str = "demo", *, redis_url: str | None = None, session_id: str | None = None,
                 engine: Any = None, store: Any = None, keys: dict[str, str] | None = None, timings: bool = True,
                 sampling: dict[str, Any] | None = None, export_dir: str | None = None,
                 max_seq_len: int | None = None, window: int | None = None) -> None:
        """`store`: a `storage.Store` to use (the caller closes it); None opens `redis_url`."""
        super().__init__()
        self.model_path, self.redis_url, self.max_seq_len, self.window = model, redis_url, max_seq_len, window
        self.session_id = session_id
        self.engine: Any = None
        self._given_engine = engine
        self.library: SessionLibrary | None = SessionLibrary(store) if store is not None else None
        self._own_library = store is None
        self.store_state = "opening"  # storage: opening | ready | failed
        self.keys = dict(keys or {})
        self.timings = timings
        self.sampling = dict(sampling or {})
        self.export_dir = export_dir or os.getcwd()
        self.sessions: dict[str, ChatSession] = {}
        self.pool: SlotPool | None = None
        self.pending: list[str] = []
        self.load_seconds: float | None = None
        self.turns = 0  # turns finished or refused (tests wait on it)
        self._reshow_after_turn = False  # a save changed while a reply streamed: show the thread again after it
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
                    # A total from the start: 0% until the loader reports its tensor count, never "--%"
                    yield ProgressBar(total=1, id="load-bar", show_eta=False)
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
        self.call_after_refresh(self._boot)

    def watch_load_state(self, state: str) -> None:
        if state == "ready":
            self.query_one("#status").add_class("-done")
        elif state == "failed":
            self.query_one("#load-bar").display = False

    # -- background -----------------------------------------------------------------------------------
    @work(thread=True, group="boot", exit_on_error=False)
    def _boot(self) -> None:
        """Thread: open storage, then load the model (torch is imported here)."""
        self._open_storage()
        self.ui_settled.wait(timeout=3.0)
        self._load_model()

    def _open_storage(self) -> None:
        """Thread: the library of stored sessions, opened unless one was given."""
        if self.library is not None:
            self.post_message(StoreReady(self.library))
            return
        try:
            self.post_message(StoreReady(SessionLibrary.open(self.redis_url)))
        except Exception as exc:  # noqa: BLE001 - shown as a notice; the app keeps running
            self.post_message(LoadFailed("storage", exc))
            self.ui_settled.set()  # nothing to show: load the model now

    def _load_model(self) -> None:
        """Thread: the engine (given, or loaded with progress) and the pool of KV slots its sessions share."""
        self.mark("model_load_start")
        t0 = time.perf_counter()
        try:
            engine = self._given_engine
            if engine is None:
                progress = throttled(lambda d, t: self.post_message(ModelProgress(d, t, "loading")))
                engine = load_engine(self.model_path, progress, self.max_seq_len,
                                     status=lambda text: self.call_from_thread(self.notify, text, timeout=8))
            self.pool = SlotPool(engine.new_slot)
        except BaseException as exc:  # noqa: BLE001
            self.post_message(LoadFailed("model", exc))
            return
        self.post_message(ModelReady(engine, time.perf_counter() - t0))

    @work(thread=True, group="bg", exit_on_error=False)
    def bg(self, fn: Callable[[], Any], then: Callable[[Any], Any] | None = None,
           on_error: Callable[[BaseException], Any] | None = None) -> None:
        """Thread: run `fn`; hand its result to `then` (or its error to `on_error`) on the UI."""
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001
            self.call_from_thread(on_error or self.show_error, exc)
            return
        if then is not None:
            self.call_from_thread(then, result)

    def show_error(self, exc: BaseException, title: str = "Error") -> None:
        self.notify(describe(exc), title=title, severity="error", timeout=10)

    # -- loading ------------------------------------------------------------------------------------
    def on_store_ready(self, msg: StoreReady) -> None:
        self.library, self.store_state = msg.library, "ready"
        self.mark("store_ready")
        self.refresh_sessions(open_first=True)

    def on_model_progress(self, msg: ModelProgress) -> None:
        self.query_one("#load-bar", ProgressBar).update(total=msg.total, progress=msg.done)

    def on_model_ready(self, msg: ModelReady) -> None:
        self.engine, self.load_seconds, self.load_state = msg.engine, msg.seconds, "ready"
        self.mark("model_ready")
        self.sub_title = Path(str(getattr(msg.engine, "source", "") or self.model_path)).name
        if self.session_id is not None and self.library is not None:
            self.open_session(self.session_id)
        elif self.pending:
            self._flush_pending()

    def on_load_failed(self, msg: LoadFailed) -> None:
        if msg.what == "model":
            self.query_one("#load-label", Label).update(f"model failed to load: {describe(msg.error)}")
            self.load_state = "failed"
            self.show_error(msg.error, "Model failed to load")
        else:
            self.store_state = "failed"
            self.show_error(msg.error, "Storage unavailable")
        if self.pending:
            self._restore("\n".join(self.pending))
            self.pending.clear()

    def _flush_pending(self) -> None:
        if self.pending and not self.streaming and self.engine is not None and self.library is not None:
            text = "\n\n".join(self.pending)
            self.pending.clear()
            self.start_turn("send", text)

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

    # -- turns --------------------------------------------------------------------------------------
    def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.streaming:
            self.notify(STREAMING, severity="warning")
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
        if self.engine is None or self.library is None or (self.session is None and self.session_id is not None):
            self.pending.append(text)
            self.notify("Still starting; your message will be sent when the model is ready.")
            return
        self.start_turn("send", text)

    def _restore(self, text: str) -> None:
        current = self.prompt.value
        self.prompt.value = text if not current.strip() else f"{text}\n{current}"

    def start_turn(self, op: str, text: str | None = None, message_id: str | None = None) -> None:
        """Run a turn ("send", "edit" or "regenerate") in the turn worker; one at a time."""
        if self.streaming:
            self.notify(STREAMING, severity="warning")
            if op == "send" and text:
                self._restore(text)
            return
        self.streaming = True
        self._turn(op, text, message_id)

    @work(thread=True, group="turn", exit_on_error=False)
    def _turn(self, op: str, text: str | None, message_id: str | None) -> None:
        """Thread: store the message, then drain the reply stream into the view."""
        session, fresh = self.session, self.session is None
        try:
            if session is None:
                session = self._new_session(title=(text or "")[:48])
            if op == "send":
                gen = session.send(text or "")
            elif op == "edit":
                gen = session.edit(message_id or "", text or "")
            else:
                gen = session.regenerate()
            shown = session_rows(session)
            if op == "regenerate" and shown and shown[-1].role == "assistant":
                shown = shown[:-1]
        except Exception as exc:  # noqa: BLE001
            if fresh and session is not None:
                self._drop_new_session(session)  # refused before anything was stored: no empty session left
            self.call_from_thread(self._turn_failed, op, text, exc)
            return
        if fresh:
            self.call_from_thread(self._adopt, session)
        self.call_from_thread(self._turn_started, shown)
        last = None
        try:
            for ev in gen:
                if ev.text:
                    self.call_from_thread(self.view.write_reply, ev.message_id, ev.text)
                last = ev
        except Exception as exc:  # noqa: BLE001
            self.call_from_thread(self.show_error, exc, "Generation failed")
        info = meter_info(session, last.report if last is not None else None)
        self.call_from_thread(self._turn_done, session.id, session_rows(session), info,
                              last.finish_reason if last else None)

    def _new_session(self, title: str = "", system: str | None = None) -> ChatSession:
        """Thread: a new stored session, live on the loaded engine."""
        assert self.library is not None
        s = self.library.new_session(self.engine, title=title, system=system, window=self.window, pool=self.pool,
                                     **self.sampling)
        self.sessions[s.id] = s
        self._watch_saves(s)
        return s

    def _drop_new_session(self, session: ChatSession) -> None:
        """Thread: delete a session made for a first message that was then refused (it holds nothing)."""
        self.sessions.pop(session.id, None)
        if self.pool is not None:
            self.pool.discard(session.id)
        if self.library is not None:
            with contextlib.suppress(Exception):  # the refusal is what the user is told about
                self.library.delete(session.id)

    def _turn_failed(self, op: str, text: str | None, exc: BaseException) -> None:
        self.streaming = False
        self.turns += 1
        if op == "send" and text:
            self._restore(text)
        if isinstance(exc, MessageTooLong):  # its hint names a library option; say what can be done here
            reason = describe(exc).partition(";")[0]
            window = self.engine.window if self.engine is not None else 0
            most = getattr(getattr(self.engine, "config", None), "max_window", window)
            more = f", or restart with a larger --max-seq-len (the model takes {most:,})" if most > window else ""
            self.notify(f"{reason}; shorten it or send it in parts{more}. Your text stays in the input.",
                        title="Message not sent", severity="error", timeout=10)
            return
        self.show_error(exc, "Message not sent" if op == "send" else "Failed")

    async def _turn_started(self, shown: list[Row]) -> None:
        await self.view.show(shown)
        await self.view.start_reply()

    async def _turn_done(self, session_id: str, shown: list[Row], info: MeterInfo, finish: str | None) -> None:
        self.streaming = False
        self.turns += 1
        if session_id == self.session_id:
            await self.view.show(shown)
            self.query_one(ContextMeter).set_info(info)
        session = self.session
        if self._reshow_after_turn and session is not None:  # saved while it streamed: the rows may be stale
            self._reshow_after_turn = False
            meter = self.query_one(ContextMeter)
            meter.set_info(dataclasses.replace(meter.info, unsaved=len(session.unsaved)))
            self.bg(lambda: session_rows(session), partial(self._reshow, session.id), on_error=lambda exc: None)
        if finish == "cancelled":
            self.notify("Reply cancelled; the partial text is kept.")
        self.refresh_sessions()
        self._flush_pending()

    def on_unmount(self) -> None:
        for session in self.sessions.values():  # stop their background retries (one last attempt each)
            session.close()
        if self._own_library and self.library is not None:
            self.library.close()


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
    if args.max_seq_len is not None and args.max_seq_len < 1:  # before the UI starts, as chatcore.load words it
        print(f"chatcore: error: max_seq_len must be a positive number of tokens, got {args.max_seq_len} "
              "(leave it out for the default)", file=sys.stderr)
        return 2
    if args.keymap is not None and not args.keymap.is_file():  # the default file may be absent; a named one not
        print(f"chatcore: error: no keymap file at {args.keymap}", file=sys.stderr)
        return 2
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
