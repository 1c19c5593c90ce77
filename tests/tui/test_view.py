"""The chat view on a long session: it opens on the last page; older messages are paged in from the top
(scrolling there, clicking the "earlier" line, or moving the selection past the first one shown)."""

from __future__ import annotations

from typing import Any

from conftest import aio, ready, send, wait_for

from storage import NewMessage


def _long(store: Any, n: int) -> Any:
    s = store.create_session("long")
    store.append_many(s.id, [NewMessage("user" if k % 2 == 0 else "assistant", f"message {k}") for k in range(n)])
    return s


@aio
async def test_long_session_opens_on_last_page_and_pages_in_from_the_top(make_app: Any, store: Any) -> None:
    from tui.widgets.chat_view import PAGE, MessageView

    _long(store, 2 * PAGE + 12)
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        view = app.view
        assert len(view.rows) == 2 * PAGE + 12 and view.first == PAGE + 12
        assert [b.row.content for b in view.boxes()] == [f"message {k}" for k in range(PAGE + 12, 2 * PAGE + 12)]
        assert all(isinstance(b, MessageView) for b in view.boxes())
        assert f"{PAGE + 12} earlier messages" in str(view.query_one("#earlier").render())
        assert view.scroll_y == view.max_scroll_y > 0  # anchored at the bottom
        top = view.boxes()[0]
        view.scroll_home(animate=False)  # the user scrolls to the top
        await wait_for(pilot, lambda: view.first == 12)
        await pilot.pause()
        assert view.boxes()[PAGE] is top and top.region.y >= view.region.y  # the view kept its place
        assert view.scroll_y > 0
        view.scroll_home(animate=False)
        await wait_for(pilot, lambda: view.first == 0)
        assert not view.query_one("#earlier").display
        assert [b.message_id for b in view.boxes()] == [r.id for r in view.rows]


@aio
async def test_clicking_the_earlier_line_pages_in(make_app: Any, store: Any) -> None:
    from tui.widgets.chat_view import PAGE

    _long(store, PAGE + 3)
    app = make_app()
    async with app.run_test(size=(100, 4 * PAGE)) as pilot:  # tall enough that the page does not scroll
        await ready(pilot)
        view = app.view
        assert view.first == 3 and view.max_scroll_y == 0
        await pilot.click("#earlier")
        await wait_for(pilot, lambda: view.first == 0)
        assert [b.row.content for b in view.boxes()][:4] == ["message 0", "message 1", "message 2", "message 3"]


@aio
async def test_selecting_past_the_first_shown_message_pages_in(make_app: Any, store: Any) -> None:
    from tui.widgets.chat_view import PAGE

    _long(store, PAGE + 5)
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        view = app.view
        assert view.first == 5
        for _ in range(PAGE + 1):
            await pilot.press("alt+up")
        await pilot.pause()
        assert view.first == 0 and view.selected == 4
        sel = [b for b in view.boxes() if b.has_class("-selected")]
        assert [b.row.content for b in sel] == ["message 4"]
        await pilot.press("ctrl+y")  # actions apply to the selected message
        await pilot.pause()
        assert app.clipboard == "message 4"


@aio
async def test_out_of_context_messages_are_dimmed(make_app: Any, store: Any) -> None:
    """A 512-token window and 20 long turns: after a reply the oldest turns are out of context, shown dimmed."""
    s = store.create_session("overflow")
    store.append_many(s.id, [NewMessage("user" if k % 2 == 0 else "assistant", f"turn {k} " + "words " * 30)
                             for k in range(40)])
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "and now?")
        boxes = app.view.boxes()
        out = [b for b in boxes if not b.row.in_context]
        assert out and all(b.has_class("-out") and "out of context" in b.header for b in out)
        assert not boxes[-1].has_class("-out")
        assert out[0].styles.opacity < 1.0
