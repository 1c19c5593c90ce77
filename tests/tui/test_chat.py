"""Pilot tests: the chat view against a real session API, a tiny real model and the embedded Redis."""

from __future__ import annotations

from typing import Any

from conftest import SlowEngine, aio, notices, open_dialog, ready, send, wait_for


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
        from tui.widgets.chat_view import MessageView

        boxes = app.view.boxes()  # the streamed reply was swapped for a finished-message widget
        assert all(isinstance(b, MessageView) for b in boxes) and [b.row for b in boxes] == rows
        meter = str(app.query_one("#meter").render())
        assert "/512" in meter and "pinned 0" in meter


@aio
async def test_cancel_keeps_partial_text(make_app: Any, store: Any, tui_engine: Any) -> None:
    sampling = {"temperature": 0.0, "max_new_tokens": 400, "ignore_eos": True}
    app = make_app(engine=SlowEngine(tui_engine), sampling=sampling)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        app.prompt.value = "Tell me a long story"
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.view.streaming_text) > 3)
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.turns == 1)
        reply = app.view.rows[-1]
        assert reply.role == "assistant" and reply.status == "cancelled"
        stored = store.thread(app.session_id)[-1]
        assert stored.status == "cancelled" and stored.content == reply.content and reply.content
        assert len(reply.content) < 400
        assert any("cancelled" in n for n in notices(app))


@aio
async def test_edit_and_regenerate_make_branches(make_app: Any, store: Any) -> None:
    from textual.widgets import TextArea

    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "first question")
        first_user = app.view.rows[0].id
        await pilot.press("f4")
        await wait_for(pilot, lambda: app.screen.query(TextArea))
        app.screen.query_one(TextArea).text = "edited question"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.turns == 2)
        assert [r.content for r in app.view.rows][0] == "edited question"
        conv = store.load(app.session_id)
        assert [m.content for m in conv.siblings(first_user)] == ["first question", "edited question"]
        old_reply = app.view.rows[-1].id
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.turns == 3)
        new_reply = app.view.rows[-1]
        assert new_reply.role == "assistant" and new_reply.id != old_reply and len(app.view.rows) == 2
        conv = store.load(app.session_id)
        assert {m.id for m in conv.siblings(new_reply.id)} == {old_reply, new_reply.id}
        # earlier branches stay reachable: back to the first reply, then to the unedited question
        await pilot.press("alt+left")
        await wait_for(pilot, lambda: app.session is not None and app.view.rows and app.view.rows[-1].id == old_reply)
        await pilot.press("alt+up", "alt+up", "alt+left")
        await wait_for(pilot, lambda: app.session is not None and app.view.rows[0].content == "first question")
        assert store.thread(app.session_id)[0].content == "first question"


@aio
async def test_pin_and_unpin(make_app: Any, store: Any) -> None:
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "remember: the code is 42")
        await pilot.press("alt+up", "alt+up")  # select the user message
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: app.view.rows[0].pinned)
        assert store.get_session(app.session_id).pinned == (app.view.rows[0].id,)
        assert "pinned 1" in str(app.query_one("#meter").render())
        box = app.view.boxes()[0]
        assert box.has_class("-pinned") and "pinned" in box.header
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: not app.view.rows[0].pinned)
        assert store.get_session(app.session_id).pinned == ()


@aio
async def test_switch_sessions_loads_only_that_session(make_app: Any, store: Any) -> None:
    from tui.widgets.session_list import SessionList

    a = store.create_session("Alpha")
    store.append_message(a.id, "user", "alpha question")
    b = store.create_session("Beta")
    store.append_message(b.id, "user", "beta question")
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        assert app.session_id == b.id  # most recent first
        assert [r.content for r in app.view.rows] == ["beta question"]
        sl = app.query_one(SessionList)
        assert [r.title for r in sl.records] == ["Beta", "Alpha"]
        sl.post_message(SessionList.Chosen(a.id))
        await wait_for(pilot, lambda: app.session is not None and app.session.id == a.id)
        await pilot.pause()
        assert [r.content for r in app.view.rows] == ["alpha question"]
        assert sl.option_list.highlighted == 1  # the open session


@aio
async def test_new_rename_delete_session(make_app: Any, store: Any) -> None:
    from textual.widgets import TextArea

    from tui.screens import ConfirmScreen, TextEditScreen

    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "hello")
        sid = app.session_id
        await open_dialog(pilot, "f2", TextEditScreen)
        app.screen.query_one(TextArea).text = "Renamed"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: store.get_session(sid).title == "Renamed")
        await pilot.press("f8")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")  # declined: still there
        await pilot.pause()
        assert store.session_exists(sid)
        await pilot.press("f8")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: not store.session_exists(sid))
        await wait_for(pilot, lambda: app.session_id is None and not app.view.rows)
        await send(pilot, "a new one")
        assert app.session_id != sid and store.session_exists(app.session_id)
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.session is None and app.view.rows == []


@aio
async def test_export_json_and_markdown(make_app: Any, tmp_path: Any) -> None:
    import json

    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "export me")
        await pilot.press("f10")
        await wait_for(pilot, lambda: list(tmp_path.glob("*.json")))
        data = json.loads(next(tmp_path.glob("*.json")).read_text())
        assert data["format"] == "chatcore.session"
        assert data["messages"][0]["content"] == "export me"
        await pilot.press("shift+f10")
        await wait_for(pilot, lambda: list(tmp_path.glob("*.md")))
        assert "export me" in next(tmp_path.glob("*.md")).read_text()
        assert any("Exported to" in n for n in notices(app))


@aio
async def test_copy_message_and_code_block(make_app: Any, store: Any) -> None:
    s = store.create_session("Code")
    u = store.append_message(s.id, "user", "show code")
    store.append_message(s.id, "assistant", "Here:\n\n```python\nprint('hi')\n```\n", parent_id=u.id)
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await pilot.press("f6")
        await pilot.pause()
        assert app.clipboard == "print('hi')"
        assert app.clipboard_file.read_text() == "print('hi')"
        await pilot.press("ctrl+y")
        await pilot.pause()
        assert app.clipboard.startswith("Here:")


@aio
async def test_system_prompt_and_params(make_app: Any, store: Any) -> None:
    from textual.widgets import Input, TextArea

    from tui.screens import ParamsScreen, TextEditScreen

    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "hi")
        await open_dialog(pilot, "ctrl+o", TextEditScreen)
        app.screen.query_one(TextArea).text = "You are terse."
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: store.get_session(app.session_id).system_prompt == "You are terse.")
        await open_dialog(pilot, "ctrl+g", ParamsScreen)
        app.screen.query_one("#p-top_k", Input).value = "abc"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, ParamsScreen)  # refused, the error shown in the form
        app.screen.query_one("#p-top_k", Input).value = "5"
        app.screen.query_one("#p-seed", Input).value = "7"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: store.get_session(app.session_id).sampling.get("top_k") == 5)
        assert store.get_session(app.session_id).sampling["seed"] == 7


@aio
async def test_actions_wait_for_the_reply_with_one_notice(make_app: Any, store: Any, tui_engine: Any) -> None:
    """While a reply streams, the actions that change the session are disabled (check_action: dimmed in
    the footer); their key or palette command gets the one notice; once the reply ends they run again."""
    from tui.actions import STREAMING

    sampling = {"temperature": 0.0, "max_new_tokens": 400, "ignore_eos": True}
    app = make_app(engine=SlowEngine(tui_engine), sampling=sampling)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        assert app.check_action("regenerate", ()) is None  # no session yet
        app.prompt.value = "Tell me a long story"
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.view.streaming_text) > 3)
        assert app.streaming and app.check_action("regenerate", ()) is None
        assert app.check_action("copy_message", ()) is True and app.check_action("rename_session", ()) is True
        await pilot.pause()
        footer = {b.binding.action: b.enabled for b in app.screen.active_bindings.values()}
        assert footer["regenerate"] is False and footer["edit"] is False and footer["help"] is True
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert notices(app).count(STREAMING) == 1
        await app.run_command("export('json')")  # the palette's way in says the same
        await pilot.pause()
        assert notices(app).count(STREAMING) == 2
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.turns == 1)
        assert [m.role for m in store.thread(app.session_id)] == ["user", "assistant"]  # ctrl+r started nothing
        assert not app.streaming and app.check_action("regenerate", ()) is True
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.streaming)
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.turns == 2)
        assert notices(app).count(STREAMING) == 2
        assert len(store.load(app.session_id).siblings(app.view.rows[-1].id)) == 2  # regenerated this time
