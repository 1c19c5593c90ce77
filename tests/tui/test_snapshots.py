"""Snapshots of the main screens (fixed size, stored messages, no timings, no generation)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ready, wait_for

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


def _before(*keys: str) -> Any:
    async def run(pilot: Any) -> None:
        await ready(pilot)
        pilot.app.prompt.cursor_blink = False
        for key in keys:
            await pilot.press(key)
        await wait_for(pilot, lambda: not pilot.app.screen.is_current or True)
        await pilot.pause(0.1)
    return run


def test_snapshot_main_screen(snap_compare: Any, make_app: Any, seeded: Any) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=_before())


def test_snapshot_help_screen(snap_compare: Any, make_app: Any, seeded: Any) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=_before("f1"))


def test_snapshot_params_screen(snap_compare: Any, make_app: Any, seeded: Any) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=_before("ctrl+g"))


def test_snapshot_delete_confirmation(snap_compare: Any, make_app: Any, seeded: Any) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=_before("f8"))
