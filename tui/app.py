"""`chatcore chat`: the Textual app. It paints at once; storage opens and the model loads (torch
imported) in a background thread worker, with progress shown; typing works meanwhile. Generation
runs in a thread worker draining the session's event stream; widgets change only through
`call_from_thread` and posted messages. The app drives context's API only: a `SessionLibrary` for the
stored sessions, a `ChatSession` for the open one."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.widgets import Footer, Header, Label, ProgressBar

from context import ChatSession, SessionLibrary, SlotPool, load_engine

from . import keymap
from .actions import Actions
from .browse import Browsing
from .display import describe
from .messages import LoadFailed, ModelProgress, ModelReady, StoreReady, throttled
from .styles import CSS
from .turns import Turns
from .widgets.chat_view import ChatView
from .widgets.meter import ContextMeter
from .widgets.prompt import PromptInput
from .widgets.session_list import SessionList


class ChatApp(Actions, Browsing, Turns, App[None]):
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
