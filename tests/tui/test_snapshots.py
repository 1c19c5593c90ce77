"""Snapshots of the main screens (fixed size, stored messages, no timings, no generation)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ready, wait_for

from tui.screens import ConfirmScreen, HelpScreen, ParamsScreen

SIZE = (110, 32)


@pytest.fixture
def seeded(store: Any) -> Any:
    old = store.create_session("Packing list")
    store.append_message(old.id, "user", "What should I pack?")
    s = store.create_session("Python help", system_prompt="You are terse.")
    u = store.append_message(s.id, "user", "How do I print in Python?")
    a = store.append_message(s.id, "assistant", "Use `print`:\n\n```python\nprint('hello')\n```", parent_id=u.id)
    store.append_message(s.id, "user", "And to a file?", parent_id=a.id)
    store.pin(s.id, u.id)
    return s


def _before(*keys: str, shows: type | None = None) -> Any:
    """Press `keys` once the app is ready, then wait until the screen `shows` is on top (None: the main
    screen alone)."""
    async def run(pilot: Any) -> None:
        await ready(pilot)
        app = pilot.app
        app.prompt.cursor_blink = False
        for key in keys:
            await pilot.press(key)
        if shows is None:
            await wait_for(pilot, lambda: len(app.screen_stack) == 1)
        else:
            await wait_for(pilot, lambda: isinstance(app.screen, shows))
        await pilot.pause(0.1)
    return run


def test_snapshot_main_screen(snap_compare: Any, make_app: Any, seeded: Any) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=_before())


def test_snapshot_help_screen(snap_compare: Any, make_app: Any, seeded: Any) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=_before("f1", shows=HelpScreen))


def test_snapshot_params_screen(snap_compare: Any, make_app: Any, seeded: Any) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=_before("ctrl+g", shows=ParamsScreen))


def test_snapshot_delete_confirmation(snap_compare: Any, make_app: Any, seeded: Any) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=_before("f8", shows=ConfirmScreen))


def test_snapshot_filter_hit_and_multi_line_draft(snap_compare: Any, make_app: Any, seeded: Any) -> None:
    """The filter finds a session by a word in one of its messages (a snippet under the title); the message
    box has grown to hold a three-line draft."""
    async def run(pilot: Any) -> None:
        await ready(pilot)
        app = pilot.app
        app.prompt.cursor_blink = False
        await pilot.press("l", "i", "n", "e", " ", "1", "ctrl+j", "l", "i", "n", "e", " ", "2", "shift+enter", "3")
        app.action_filter_sessions()
        await pilot.press(*"hello")
        sidebar = app.query_one("#sidebar")
        await wait_for(pilot, lambda: sidebar.hits is not None and sidebar.hits[0] == "hello")
        app.query_one("#filter").cursor_blink = False
        await pilot.pause(0.1)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run)
