"""The multi-line message box: Enter sends, Shift+Enter / Ctrl+J break the line, it grows to a few lines,
multi-line pastes arrive whole, and the draft survives a streaming reply and a refused message."""

from __future__ import annotations

from typing import Any

from conftest import SlowEngine, aio, notices, ready, send, wait_for
from textual import events


@aio
async def test_enter_sends_and_ctrl_j_or_shift_enter_break_the_line(make_app: Any, store: Any) -> None:
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        prompt = app.prompt
        one_line = prompt.outer_size.height
        await pilot.press("h", "i", "ctrl+j", "t", "w", "o", "shift+enter", "3")
        await pilot.pause()
        assert prompt.value == "hi\ntwo\n3" and app.turns == 0  # nothing sent yet
        assert prompt.outer_size.height == one_line + 2  # it grew a line per line
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.turns == 1)
        assert [r.content for r in app.view.rows][0] == "hi\ntwo\n3"
        assert store.thread(app.session_id)[0].content == "hi\ntwo\n3"
        assert prompt.value == "" and prompt.outer_size.height == one_line


@aio
async def test_growth_stops_at_a_few_lines(make_app: Any) -> None:
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        app.prompt.value = "\n".join(f"line {i}" for i in range(20))
        await pilot.pause()
        assert app.prompt.outer_size.height == 8  # max-height; the rest scrolls inside the box
        assert app.view.size.height > 10  # the chat keeps most of the screen


@aio
async def test_multi_line_paste_is_inserted_whole(make_app: Any) -> None:
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await pilot.press("a", ":", "space")
        app.post_message(events.Paste("def f():\n    return 1\n"))  # as the terminal driver delivers it
        await pilot.pause()
        assert app.prompt.value == "a: def f():\n    return 1\n" and app.turns == 0


@aio
async def test_draft_survives_a_streaming_reply(make_app: Any, tui_engine: Any) -> None:
    sampling = {"temperature": 0.0, "max_new_tokens": 400, "ignore_eos": True}
    app = make_app(engine=SlowEngine(tui_engine), sampling=sampling)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        app.prompt.value = "first"
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.view.streaming_text) > 3)
        await pilot.press("n", "ctrl+j", "l")
        await pilot.press("enter")  # refused while the reply streams: kept
        await pilot.pause()
        assert app.prompt.value == "n\nl"
        assert any("still streaming" in n for n in notices(app)) and app.streaming
        await pilot.press("escape")  # the reply stops; the draft stays
        await wait_for(pilot, lambda: app.turns == 1)
        assert app.prompt.value == "n\nl" and len(app.view.rows) == 2
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.view.rows) == 3)
        assert app.view.rows[2].content == "n\nl" and app.prompt.value == ""
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.turns == 2)


@aio
async def test_refused_multi_line_message_is_restored_exactly(make_app: Any) -> None:
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        big = "first line\n" + "word " * 400 + "\nlast line"  # > the 512-token window
        await send(pilot, big)
        assert app.prompt.value == big and app.view.rows == []
