"""Pilot test: a turn sent while Redis is down is shown marked "not saved yet — retrying" (in the message
headers and the meter), and the marks go once the session's background retry stores it, with no key pressed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _context_helpers import RedisProcess
from conftest import aio, notices, ready, send, wait_for

from storage import StoreConfig
from storage.connect import open_url
from tui.widgets.chat_view import NOT_SAVED

pytestmark = pytest.mark.redis


def _headers(app: Any) -> list[str]:
    return [box.header for box in app.view.boxes()]


@aio
async def test_a_turn_kept_while_redis_is_down_is_marked_until_the_retry_stores_it(make_app: Any,
                                                                                  tmp_path: Path) -> None:
    server = RedisProcess(tmp_path / "redis").start()
    store = open_url(server.url, config=StoreConfig(timeout=0.5, keepalive=None))
    try:
        app = make_app(store=store)
        async with app.run_test(size=(110, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "one")
            assert not any(NOT_SAVED in h for h in _headers(app))
            server.kill()
            await send(pilot, "two")
            assert [NOT_SAVED in h for h in _headers(app)] == [False, False, True, True]
            assert [r.pending for r in app.view.rows] == [False, False, True, True]
            meter = app.query_one("#meter")
            assert "2 messages not saved yet — retrying" in str(meter.render()) and meter.has_class("-unsaved")
            server.start()
            await wait_for(pilot, lambda: not any(NOT_SAVED in h for h in _headers(app)), timeout=90)
            assert "not saved" not in str(meter.render()) and not meter.has_class("-unsaved")
            assert any("saved" in n for n in notices(app))
            stored = store.thread(app.session_id)
            assert [m.content for m in stored] == [r.content for r in app.view.rows]
            assert [m.role for m in stored] == ["user", "assistant"] * 2
    finally:
        store.close()
        server.kill()
