"""Pilot tests: the chat view against a real session API, a tiny real model and the embedded Redis."""

from __future__ import annotations

from typing import Any

from conftest import aio, notices, ready, send, wait_for


@aio
async def test_send_streams_reply(make_app: Any, store: Any) -> None:
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "Hello there")
        rows = app.view.rows
        assert [r.role for r in rows] == ["user", "assistant"]
        assert rows[0].content == "Hello there" and rows[1].content
        stored = store.thread(app.session_id)
        assert [m.content for m in stored] == [r.content for r in rows]
        assert app.prompt.value == ""
        meter = str(app.query_one("#meter").render())
        assert "/512" in meter and "pinned 0" in meter
