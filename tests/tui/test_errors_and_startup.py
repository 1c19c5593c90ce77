"""Errors as notices (the app keeps running, nothing typed is lost); first paint before the model loads; no torch
on import."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import RecordingApp, aio, notices, ready, send, wait_for

from tui import keymap


@aio
async def test_bad_model_path_is_a_notice_and_keeps_typed_text(store: Any, tmp_path: Path) -> None:
    app = RecordingApp(str(tmp_path / "no-such-model"), store=store, timings=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.load_state == "failed")
        assert any("no-such-model" in n for n in notices(app))
        app.prompt.value = "my precious text"
        await pilot.press("enter")
        await pilot.pause()
        assert app.prompt.value == "my precious text"
        assert app.is_running


@aio
async def test_dead_redis_is_a_notice_and_keeps_typed_text(tui_engine: Any) -> None:
    app = RecordingApp(engine=tui_engine, redis_url="redis://127.0.0.1:1", timings=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.load_state == "ready" and notices(app), timeout=30)
        assert any("127.0.0.1:1" in n for n in notices(app)), notices(app)
        app.prompt.value = "keep me"
        await pilot.press("enter")
        await pilot.pause()
        assert app.prompt.value == "keep me" and app.is_running


@aio
async def test_a_password_in_the_redis_url_is_not_shown(tui_engine: Any) -> None:
    app = RecordingApp(engine=tui_engine, redis_url="redis://127.0.0.1:1/0?username=al&password=hunter2-pw",
                       timings=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.load_state == "ready" and notices(app), timeout=30)
        assert any("password=***" in n for n in notices(app)), notices(app)
        assert not any("hunter2" in n for n in notices(app)), notices(app)


@aio
async def test_prompt_too_large_is_refused_and_restored(make_app: Any, store: Any) -> None:
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        big = "word " * 400  # > the 512-token window
        await send(pilot, big)
        assert app.prompt.value == big.strip()
        assert app.view.rows == [] and any("window" in n or "fit" in n for n in notices(app)), notices(app)
        await send(pilot, "small")  # the app still works
        assert [r.role for r in app.view.rows] == ["user", "assistant"]


@aio
async def test_first_paint_and_typing_while_the_model_loads(store: Any, tui_model_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The first paint never waits for the model: the load is held until the app is up and has taken input
    (ordered by an event, not timed)."""
    import tui.app
    release, load = threading.Event(), tui.app.load_engine

    def held(*args: Any, **kw: Any) -> Any:
        release.wait(timeout=120)
        return load(*args, **kw)

    monkeypatch.setattr(tui.app, "load_engine", held)
    app = RecordingApp(str(tui_model_dir), store=store, timings=False,
                       sampling={"temperature": 0.0, "max_new_tokens": 8})
    async with app.run_test(size=(100, 30)) as pilot:
        try:
            assert app.load_state == "loading"
            assert app.prompt.region.area > 0 and app.query_one("#load-bar").display  # painted, load pending
            app.prompt.value = "typed while loading"
            await pilot.press("enter")
            await pilot.pause()
            assert app.load_state == "loading" and app.turns == 0
        finally:
            release.set()
        await wait_for(pilot, lambda: app.turns == 1, timeout=60)
        assert [r.content for r in app.view.rows][0] == "typed while loading"
        assert not app.query_one("#status").display or app.query_one("#status").has_class("-done")


def test_import_tui_app_does_not_import_torch_or_redis() -> None:
    code = "import sys, tui.app; bad = [m for m in ('torch', 'redis') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "[]"


def test_keymap_parsing_and_sources(tmp_path: Path) -> None:
    assert keymap.parse_pairs("regenerate=f5,f9, edit=ctrl+l") == {"regenerate": "f5,f9", "edit": "ctrl+l"}
    (tmp_path / "keymap.toml").write_text('# mine\npin = "ctrl+p"\nhelp = "f12"\n')
    env = {"CHATCORE_HOME": str(tmp_path), "CHATCORE_KEYMAP": "help=f11"}
    assert keymap.load_keymap(env=env) == {"pin": "ctrl+p", "help": "f11"}
    import pytest

    with pytest.raises(ValueError, match="unknown key binding 'nope'"):
        keymap.parse_pairs("nope=f1")


@aio
async def test_remapped_key_help_and_palette(make_app: Any) -> None:
    from textual.widgets import Markdown

    from tui.screens import HelpScreen

    app = make_app(keys={"help": "f12", "regenerate": "f5"})
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await pilot.press("f12")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert "`f5` | Regenerate" in app.screen.query_one(Markdown).source
        await pilot.press("escape")
        await pilot.pause()
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {a.description for a in keymap.ACTIONS} <= titles
        await send(pilot, "hi")
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.turns == 2)


def test_model_progress_is_throttled_but_ends_complete() -> None:
    from tui.messages import throttled

    seen: list[tuple[int, int]] = []
    hook = throttled(lambda done, total: seen.append((done, total)), interval=10.0)
    for i in range(1, 273):
        hook(i, 272)
    assert seen == [(1, 272), (272, 272)]  # the first step, then nothing until the last one


@aio
async def test_the_load_progress_bar_shows_a_percentage(store: Any, tui_model_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar shows how far the load is from the start (0% before the first tensor), never `--%`."""
    import time

    from textual.widgets import ProgressBar

    import tui.app
    started, halfway, release, load = threading.Event(), threading.Event(), threading.Event(), tui.app.load_engine

    def held(model: Any, progress: Any = None, *args: Any, **kw: Any) -> Any:
        started.wait(timeout=120)
        progress(1, 10)
        time.sleep(0.1)  # past the throttle
        progress(5, 10)
        halfway.set()
        release.wait(timeout=120)
        return load(model, progress, *args, **kw)

    monkeypatch.setattr(tui.app, "load_engine", held)
    app = RecordingApp(str(tui_model_dir), store=store, timings=False)
    async with app.run_test(size=(100, 30)) as pilot:
        try:
            bar = app.query_one("#load-bar", ProgressBar)
            await pilot.pause(0.1)
            assert str(bar.query_one("#percentage").render()).strip() == "0%"
            started.set()
            await wait_for(pilot, lambda: halfway.is_set() and bar.progress == 5)
            await pilot.pause(0.1)
            assert str(bar.query_one("#percentage").render()).strip() == "50%"
        finally:
            started.set()
            release.set()
        await wait_for(pilot, lambda: app.load_state == "ready", timeout=60)


@aio
async def test_a_refused_first_message_leaves_no_session_and_a_hint_for_the_tui(make_app: Any, store: Any) -> None:
    """Too long for the window as the first message of a new session: no session is stored (none opens next
    time), and the notice says what a TUI user can do (no library option named)."""
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        big = "word " * 400
        await send(pilot, big)
        assert not store.list_sessions(0, 10).sessions
        assert app.session is None and app.session_id is None and app.prompt.value == big.strip()
        said = [n for n in notices(app) if "fit" in n or "tokens" in n]
        assert said and not any("oversize" in n or "truncate" in n for n in said), said
        assert "shorten it or send it in parts" in said[-1] and "stays in the input" in said[-1], said
        assert "--max-seq-len" not in said[-1]  # the window is the model's whole one already
        await send(pilot, "small")  # the app still works, in one new session
        assert len(store.list_sessions(0, 10).sessions) == 1 and app.session_id is not None
