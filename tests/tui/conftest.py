"""TUI fixtures: a tiny random-weight chat model with a real (byte-level) tokenizer, an embedded Redis
flushed per test, and a factory for ChatApp wired to both (greedy decoding, no timings shown)."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "context"))
from _context_helpers import make_chat_model_dir  # noqa: E402
from _shared_fixtures import _embedded, _one_torch_thread, store  # noqa: E402, F401  (fixtures)

from storage import Store  # noqa: E402
from tui.app import ChatApp  # noqa: E402


class RecordingApp(ChatApp):
    """ChatApp that also keeps the text of every notice it shows (through Textual's public ``notify``), so a
    test reads them after they have timed out too."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.notices: list[str] = []

    def notify(self, message: str, **kw: Any) -> None:
        self.notices.append(message)
        super().notify(message, **kw)


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the user's keymap or writes a clipboard file outside tmp."""
    monkeypatch.setenv("CHATCORE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CHATCORE_KEYMAP", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)


@pytest.fixture(scope="session")
def tui_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_model_dir(tmp_path_factory.mktemp("tui-chat"))


@pytest.fixture(scope="session")
def tui_engine(tui_model_dir: Path) -> Any:
    import chatcore

    return chatcore.load(tui_model_dir, device="cpu", dtype="float32", max_seq_len=512)


@pytest.fixture
def make_app(tui_engine: Any, store: Store, tmp_path: Path) -> Callable[..., Any]:  # noqa: F811 (the fixture)
    def make(**kw: Any) -> RecordingApp:
        kw.setdefault("engine", tui_engine)
        kw.setdefault("store", store)
        kw.setdefault("timings", False)
        kw.setdefault("sampling", {"temperature": 0.0, "max_new_tokens": 12})
        kw.setdefault("export_dir", str(tmp_path))
        return RecordingApp(**kw)

    return make


def aio(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an async test with asyncio.run (no async plugin needed)."""
    @functools.wraps(fn)
    def run(*args: Any, **kw: Any) -> Any:
        return asyncio.run(fn(*args, **kw))
    return run


async def wait_for(pilot: Any, cond: Callable[[], Any], timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            app = pilot.app
            shown = [(r.role, r.status, len(r.content)) for r in app.view.rows]
            raise AssertionError(f"timed out waiting for the app; notices: {notices(app)}; turns {app.turns} "
                                 f"streaming {app.streaming} rows {shown}")
        await pilot.pause(0.02)


async def ready(pilot: Any) -> None:
    """Model loaded, storage open, and the first session (if any) shown."""
    app = pilot.app
    await wait_for(pilot, lambda: app.load_state != "loading" and app.library is not None)
    await wait_for(pilot, lambda: app.session_id is None or app.live_shown == app.session_id)
    await wait_for(pilot, lambda: app.query_one("#sidebar").loaded)
    await pilot.pause()


async def send(pilot: Any, text: str) -> None:
    app = pilot.app
    before = app.turns
    app.prompt.value = text
    app.prompt.focus()
    await pilot.press("enter")
    await wait_for(pilot, lambda: app.turns > before)
    await pilot.pause()


async def open_dialog(pilot: Any, key: str, screen: type) -> Any:
    """Press `key` and wait until a new `screen` (a dialog class of tui.screens) is on top with its fields
    composed; returns it."""
    from textual.widgets import Input, TextArea

    app = pilot.app
    before = app.screen
    await pilot.press(key)
    await wait_for(pilot, lambda: isinstance(app.screen, screen) and app.screen is not before
                   and bool(app.screen.query(TextArea) or app.screen.query(Input)))
    return app.screen


def notices(app: RecordingApp) -> list[str]:
    return list(app.notices)


class SlowEngine:
    """The engine, with a pause per token (so a test can act mid-stream)."""

    def __init__(self, engine: Any, delay: float = 0.02) -> None:
        self._engine, self._delay = engine, delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, *args: Any, **kw: Any) -> Iterator[Any]:
        import time

        gen = self._engine.generate(*args, **kw)
        try:
            for ev in gen:
                time.sleep(self._delay)
                yield ev
        finally:
            gen.close()
