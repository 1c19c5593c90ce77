"""What a message looks like on screen: line breaks kept, flags in the header (branches, context)."""

from __future__ import annotations

from typing import Any

from conftest import SlowEngine, aio, ready, send, wait_for


def screen_lines(widget: Any) -> list[str]:
    """The widget's lines as painted (its own rendering, at its size), right-stripped."""
    from textual.geometry import Region

    return [s.text.rstrip() for s in widget.render_lines(Region(0, 0, widget.size.width, widget.size.height))]


@aio
async def test_line_breaks_inside_a_paragraph_are_shown(make_app: Any, store: Any) -> None:
    """A single newline is a line break on screen (stored text keeps it); code blocks are untouched."""
    s = store.create_session("Breaks")
    u = store.append_message(s.id, "user", "first line\nsecond line")
    store.append_message(s.id, "assistant", "roses\nviolets\n\n```\na = 1\nb = 2\n```", parent_id=u.id)
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        user, reply = app.view.boxes()
        lines = screen_lines(user)
        assert any(line.endswith("first line") for line in lines), lines
        assert any(line.endswith("second line") for line in lines), lines
        lines = [line.strip(" █") for line in screen_lines(reply)]
        assert "roses" in lines and "violets" in lines, lines
        assert any(line.startswith("a = 1") for line in lines) and any(line.startswith("b = 2") for line in lines)
        assert app.view.rows[0].content == "first line\nsecond line"


@aio
async def test_line_breaks_show_while_a_reply_streams(make_app: Any) -> None:
    """The streamed reply's Markdown widget breaks lines the same way."""
    from textual.widgets import Markdown

    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await app.view.start_reply()
        await app.view.write_reply("m1", "one\ntwo\n\nthree")
        await pilot.pause(0.2)
        md = app.view.boxes()[-1].query_one(Markdown)
        lines = [line.strip() for block in md.children for line in screen_lines(block)]
        assert "one" in lines and "two" in lines and "three" in lines, lines
        await app.view.end_stream()


@aio
async def test_an_edited_message_is_in_context_while_its_reply_streams(make_app: Any, tui_engine: Any) -> None:
    from textual.widgets import TextArea

    app = make_app(engine=SlowEngine(tui_engine))
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "first question")
        app.sampling.update(max_new_tokens=400, ignore_eos=True)
        app.session.set_params(max_new_tokens=400, ignore_eos=True)
        await pilot.press("f4")
        await wait_for(pilot, lambda: app.screen.query(TextArea))
        app.screen.query_one(TextArea).text = "edited question"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: len(app.view.streaming_text) > 3)
        edited = app.view.boxes()[0]
        assert edited.row.content == "edited question"
        assert edited.row.in_context and "out of context" not in edited.header and not edited.has_class("-out")
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.turns == 2)
        assert app.view.rows[0].in_context


@aio
async def test_a_message_with_branches_shows_its_position_in_the_header(make_app: Any, store: Any) -> None:
    """‹2/2› on an edited message and on a regenerated reply; alt+left shows ‹1/2›; a message without
    alternatives has no marker. The stored view (before the model is used) shows them too."""
    from textual.widgets import TextArea

    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "first question")
        assert "‹" not in app.view.boxes()[0].header
        await pilot.press("f4")
        await wait_for(pilot, lambda: app.screen.query(TextArea))
        app.screen.query_one(TextArea).text = "edited question"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.turns == 2)
        user, reply = app.view.boxes()
        assert user.header.startswith("user ‹2/2›") and "‹" not in reply.header
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.turns == 3)
        await wait_for(pilot, lambda: len(app.view.boxes()) == 2 and "‹" in app.view.boxes()[1].header)
        assert app.view.boxes()[1].header.startswith("assistant ‹2/2›")
        await pilot.press("alt+left")
        await wait_for(pilot, lambda: app.view.boxes()[-1].header.startswith("assistant ‹1/2›"))
        sid = app.session_id
    assert app.library is not None
    shown = app.library.branches(sid)
    thread = store.thread(sid)
    assert shown == {thread[0].id: (2, 2), thread[1].id: (1, 2)}
