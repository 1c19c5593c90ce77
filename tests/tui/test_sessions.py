"""The session list: paging through 1,000 sessions, and the filter (titles and message text, searched in
storage, so sessions not loaded yet are found too)."""

from __future__ import annotations

from typing import Any

from conftest import aio, notices, ready, wait_for

from storage import NewMessage


def _fill(store: Any, n: int) -> list[Any]:
    """n sessions, oldest first; the oldest has a word no other session uses, in a message only."""
    out = []
    for i in range(n):
        s = store.create_session(f"session {i}")
        words = "the zebra crossing" if i == 0 else f"answer {i}"
        store.append_many(s.id, [NewMessage("user", f"question {i}"), NewMessage("assistant", words)])
        out.append(s)
    return out


async def _type_filter(pilot: Any, text: str) -> Any:
    sl = pilot.app.query_one("#sidebar")
    pilot.app.action_filter_sessions()
    sl.query_one("#filter").value = ""
    await pilot.press(*text)
    await wait_for(pilot, lambda: sl.hits is not None and sl.hits[0] == text)
    await pilot.pause()
    return sl


@aio
async def test_filter_searches_titles_and_message_text_of_all_sessions(make_app: Any, store: Any) -> None:
    from tui.widgets.session_list import MORE, PAGE

    sessions = _fill(store, 1000)
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        sl = app.query_one("#sidebar")
        assert len(sl.records) == PAGE < 1000 and sl.option_list.options[-1].id == MORE
        assert sessions[0].id not in sl.shown_ids()  # the oldest is not loaded
        sl = await _type_filter(pilot, "zebra")  # only in a message of the oldest session
        assert sl.shown_ids() == [sessions[0].id]
        assert "zebra crossing" in str(sl.option_list.options[0].prompt)  # the snippet under the title
        sl = await _type_filter(pilot, "session 99")  # titles: 99 and 990..999, most recent first
        assert sl.shown_ids() == [s.id for s in reversed(sessions) if s.title.startswith("session 99")]
        sl = await _type_filter(pilot, "no such words")
        assert sl.shown_ids() == []
        sl.query_one("#filter").value = ""
        await pilot.pause()
        assert len(sl.shown_ids()) == PAGE
        # choosing a hit opens that session
        sl = await _type_filter(pilot, "zebra")
        sl.option_list.focus()
        sl.option_list.highlighted = 0
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.session is not None and app.session.id == sessions[0].id)
        assert [r.content for r in app.view.rows] == ["question 0", "the zebra crossing"]


@aio
async def test_more_row_loads_the_next_page(make_app: Any, store: Any) -> None:
    from tui.widgets.session_list import MORE, PAGE

    sessions = _fill(store, PAGE + 5)
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        sl = app.query_one("#sidebar")
        assert len(sl.shown_ids()) == PAGE
        sl.option_list.focus()
        sl.option_list.highlighted = len(sl.option_list.options) - 1
        assert sl.option_list.highlighted_option.id == MORE
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(sl.shown_ids()) == PAGE + 5)
        assert sl.shown_ids() == [s.id for s in reversed(sessions)]
        assert MORE not in [o.id for o in sl.option_list.options]


@aio
async def test_session_option_takes_a_prefix_and_an_unknown_id_is_a_notice(make_app: Any, store: Any) -> None:
    old = store.create_session("Old")
    store.append_message(old.id, "user", "old question")
    new = store.create_session("New")
    store.append_message(new.id, "user", "new question")
    app = make_app(session_id=old.id[:-4])  # a unique prefix of the older session
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        assert app.session_id == old.id and [r.content for r in app.view.rows] == ["old question"]
    app = make_app(session_id="nosuchsession")
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        assert any("no session 'nosuchsession'; starting a new one" in n for n in notices(app)), notices(app)
        assert app.session_id == new.id and [r.content for r in app.view.rows] == ["new question"]
