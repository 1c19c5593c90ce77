"""SessionLibrary (stored sessions for a front end, no model needed) and the ChatSession methods a front end
uses besides turns: pinned, summary, switch_branch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _context_helpers import drain

import context
from context import ChatMessage, ChatSession, ContextError, SessionBusy, SessionLibrary
from storage import NewMessage, Store


def _seed(store: Store) -> tuple[Any, list[Any]]:
    s = store.create_session("Trip")
    msgs = store.append_many(s.id, [NewMessage("user", "Where to?"), NewMessage("assistant", "Lisbon.")])
    store.pin(s.id, msgs[0].id)
    return s, msgs


def test_library_lists_resolves_and_shows_stored_sessions(store: Store) -> None:
    s, msgs = _seed(store)
    other = store.create_session("Other")
    lib = SessionLibrary(store)
    page = lib.page(0, 1)
    assert [r.id for r in page.sessions] == [other.id] and page.next_offset == 1
    assert lib.resolve(s.id[:-3]) == s.id and lib.resolve(s.id) == s.id
    with pytest.raises(context.NotFound, match="no session 'nope'; starting a new one"):
        lib.resolve("nope")
    shown = lib.messages(s.id)
    assert all(isinstance(m, ChatMessage) for m in shown)
    assert [(m.id, m.role, m.content, m.pinned, m.in_context) for m in shown] == [
        (msgs[0].id, "user", "Where to?", True, True), (msgs[1].id, "assistant", "Lisbon.", False, True)]
    assert [h.session.id for h in lib.search("lisbon")] == [s.id]
    lib.rename(s.id, "Holidays")
    assert lib.get(s.id).title == "Holidays"
    assert lib.delete(s.id) and not store.session_exists(s.id) and not lib.delete(s.id)


def test_library_opens_and_creates_live_sessions(chat_engine: Any, store: Store) -> None:
    s, _ = _seed(store)
    lib = SessionLibrary(store)
    live = lib.session(chat_engine, s.id)
    assert isinstance(live, ChatSession) and live.id == s.id and live.pinned == tuple(lib.get(s.id).pinned)
    assert [m.content for m in live.messages()] == [m.content for m in lib.messages(s.id)]
    new = lib.new_session(chat_engine, title="Fresh", system="Be brief.", max_new_tokens=3)
    assert lib.get(new.id).title == "Fresh" and new.system == "Be brief." and new.params == {"max_new_tokens": 3}


def test_storage_errors_reach_front_ends_through_context_lazily() -> None:
    code = ("import sys, context, context.errors; before = 'redis' in sys.modules; "
            "from context import NotFound, StoreUnavailable, StorageError; import storage; "
            "assert NotFound is storage.NotFound and StoreUnavailable is storage.StoreUnavailable; "
            "assert context.errors.StorageError is storage.StorageError; print(before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "False"  # `import context` alone did not import redis
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        context.Nope  # noqa: B018


def test_pinned_and_summary_read_the_live_context(chat_engine: Any, store: Store) -> None:
    s, msgs = _seed(store)
    live = ChatSession.open(chat_engine, store, s.id)
    assert live.pinned == (msgs[0].id,) and live.summary is None
    live.unpin(msgs[0].id)
    assert live.pinned == ()
    store.set_summary(s.id, "They talked about a trip.", msgs[0].id, msgs[1].id)
    assert ChatSession.open(chat_engine, store, s.id).summary == "They talked about a trip."


def test_switch_branch_walks_siblings_and_reloads_the_thread(chat_engine: Any, store: Store) -> None:
    live = ChatSession.create(chat_engine, store, max_new_tokens=4)
    drain(live.send("first"))
    first_user, first_reply = (m.id for m in live.messages())
    drain(live.edit(first_user, "edited"))
    edited = live.messages()[0].id
    assert [m.content for m in live.messages()][0] == "edited"
    assert live.switch_branch(edited, -1) == (1, 2)
    assert [m.id for m in live.messages()] == [first_user, first_reply]  # the old branch, down to its leaf
    assert [m.id for m in store.thread(live.id)] == [first_user, first_reply]
    assert live.switch_branch(first_user, 1) == (2, 2)
    assert live.messages()[0].content == "edited" and len(live.messages()) == 2
    assert live.switch_branch(edited, 1) == (1, 2)  # wraps around
    with pytest.raises(ContextError, match="no other branch"):
        live.switch_branch(first_reply, 1)
    drain(live.send("and then?"))  # the reloaded thread takes a turn like an opened one
    assert [m.role for m in store.thread(live.id)] == ["user", "assistant", "user", "assistant"]


def test_switch_branch_refuses_while_a_reply_streams(chat_engine: Any, store: Store) -> None:
    live = ChatSession.create(chat_engine, store, max_new_tokens=8)
    drain(live.send("one"))
    stream = live.send("two")
    next(stream)
    with pytest.raises(SessionBusy):
        live.switch_branch(live.messages()[0].id, 1)
    stream.close()
