"""Messages: idempotent appends, atomic batches, branches, the tip, deletion, token counts."""

from __future__ import annotations

import pytest

from storage import Conflict, InvalidInput, NewMessage, NotFound, Store

pytestmark = pytest.mark.redis


def test_append_builds_the_thread_in_order(store: Store) -> None:
    s = store.create_session()
    u = store.append_message(s.id, "user", "hello")
    a = store.append_message(s.id, "assistant", "hi!", tokens=3)
    t = store.append_message(s.id, "tool", "42", extra={"tool_call_id": "call_1", "name": "calc"})
    assert (u.parent_id, a.parent_id, t.parent_id) == (None, u.id, a.id)
    assert [u.seq, a.seq, t.seq] == [0, 1, 2]
    thread = store.thread(s.id)
    assert [m.id for m in thread] == [u.id, a.id, t.id]
    assert thread[1].tokens == 3 and thread[2].extra == {"tool_call_id": "call_1", "name": "calc"}
    assert thread == [u, a, t]  # what append returned is exactly what is stored
    session = store.get_session(s.id)
    assert session.tip_id == t.id and session.message_count == 3


def test_append_is_idempotent_by_message_id(store: Store) -> None:
    s = store.create_session()
    first = store.append_message(s.id, "user", "only once", message_id="m-1")
    store.append_message(s.id, "assistant", "reply")
    again = store.append_message(s.id, "user", "only once", message_id="m-1")  # a retried write
    assert again == first
    assert [m.content for m in store.thread(s.id)] == ["only once", "reply"]  # tip did not move back
    assert store.get_session(s.id).message_count == 2
    with pytest.raises(Conflict, match="different content"):
        store.append_message(s.id, "user", "something else", message_id="m-1")


def test_batch_is_atomic_and_chains(store: Store) -> None:
    s = store.create_session()
    out = store.append_many(s.id, [NewMessage("user", "q"), NewMessage("assistant", "a"),
                                   NewMessage("user", "q2")])
    assert [m.parent_id for m in out] == [None, out[0].id, out[1].id]
    with pytest.raises(NotFound, match="message 'missing'"):
        store.append_many(s.id, [NewMessage("user", "x"), NewMessage("assistant", "y", parent_id="missing")])
    assert len(store.load(s.id).messages) == 3  # nothing of the refused batch was written
    assert store.get_session(s.id).tip_id == out[2].id


def test_invalid_messages_are_refused(store: Store) -> None:
    s = store.create_session()
    with pytest.raises(InvalidInput, match="role"):
        store.append_message(s.id, "robot", "x")
    with pytest.raises(InvalidInput, match="status"):
        store.append_message(s.id, "user", "x", status="done")
    with pytest.raises(InvalidInput, match="reserved"):
        store.append_message(s.id, "user", "x", extra={"role": "system"})
    with pytest.raises(InvalidInput, match="message id"):
        store.append_message(s.id, "user", "x", message_id="has space")
    with pytest.raises(InvalidInput, match="message id"):
        store.append_message(s.id, "user", "x", message_id="{tag}")
    with pytest.raises(InvalidInput, match="tokens"):
        store.append_message(s.id, "user", "x", tokens=-1)
    assert store.load(s.id).messages == ()


def test_edit_and_regenerate_make_siblings(store: Store) -> None:
    s = store.create_session()
    u = store.append_message(s.id, "user", "Capital of France?")
    a = store.append_message(s.id, "assistant", "Lyon")
    with store.regenerate(s.id, a.id) as w:
        w.write("Paris")
    a2 = w.finished
    assert a2 is not None and a2.parent_id == u.id
    conv = store.load(s.id)
    assert [m.content for m in conv.siblings(a.id)] == ["Lyon", "Paris"]
    assert [m.content for m in conv.thread()] == ["Capital of France?", "Paris"]

    e = store.edit_message(s.id, u.id, "Capital of Italy?")
    assert e.parent_id is None and e.role == "user"
    conv = store.load(s.id)
    assert [m.content for m in conv.thread()] == ["Capital of Italy?"]
    assert [m.id for m in conv.siblings(u.id)] == [u.id, e.id]
    assert {m.id for m in conv.messages} == {u.id, a.id, a2.id, e.id}  # nothing overwritten

    with pytest.raises(InvalidInput, match="only replies"):
        store.regenerate(s.id, u.id)

    assert store.switch_branch(s.id, u.id) == a2.id  # back to the newest leaf of the old branch
    assert [m.content for m in store.thread(s.id)] == ["Capital of France?", "Paris"]
    store.set_tip(s.id, a.id)
    assert [m.content for m in store.thread(s.id)] == ["Capital of France?", "Lyon"]
    with pytest.raises(NotFound):
        store.set_tip(s.id, "nope")


def test_delete_message_removes_the_subtree_and_moves_the_tip(store: Store) -> None:
    s = store.create_session()
    u = store.append_message(s.id, "user", "u")
    a1 = store.append_message(s.id, "assistant", "a1")
    f = store.append_message(s.id, "user", "follow-up")
    a2 = store.append_message(s.id, "assistant", "a2", parent_id=u.id)  # regeneration, now the tip
    store.set_tip(s.id, f.id)
    store.pin(s.id, f.id)
    store.set_summary(s.id, "sum", u.id, a1.id)
    store.set_token_counts(s.id, {a1.id: 2, f.id: 1})

    removed = store.delete_message(s.id, a1.id)
    assert sorted(removed) == sorted([a1.id, f.id])
    conv = store.load(s.id)
    assert [m.id for m in conv.messages] == [u.id, a2.id]
    assert conv.session.tip_id == a2.id  # newest leaf left under the deleted message's parent
    assert conv.session.pinned == () and conv.session.summary is None
    assert conv.session.message_count == 2

    store.delete_message(s.id, u.id)
    conv = store.load(s.id)
    assert conv.messages == () and conv.session.tip_id is None
    with pytest.raises(NotFound):
        store.delete_message(s.id, u.id)


def test_token_counts(store: Store) -> None:
    s = store.create_session()
    a = store.append_message(s.id, "user", "a")
    b = store.append_message(s.id, "assistant", "b")
    assert store.set_token_counts(s.id, {a.id: 4, b.id: 7, "unknown": 1}) == 2
    assert [m.tokens for m in store.thread(s.id)] == [4, 7]
    assert store.get_message(s.id, b.id).tokens == 7
    with pytest.raises(InvalidInput):
        store.set_token_counts(s.id, {a.id: -3})


def test_get_message(store: Store) -> None:
    s = store.create_session()
    store.append_message(s.id, "user", "a")
    b = store.append_message(s.id, "assistant", "b")
    assert store.get_message(s.id, b.id) == b
    with pytest.raises(NotFound):
        store.get_message(s.id, "nope")


def test_conversation_helpers(store: Store) -> None:
    s = store.create_session()
    r = store.append_message(s.id, "user", "root")
    x = store.append_message(s.id, "assistant", "x")
    y = store.append_message(s.id, "assistant", "y", parent_id=r.id)
    z = store.append_message(s.id, "user", "z", parent_id=x.id)
    conv = store.load(s.id)
    assert [m.id for m in conv.children(None)] == [r.id]
    assert [m.id for m in conv.children(r.id)] == [x.id, y.id]
    assert conv.latest_leaf(r.id) == y.id and conv.latest_leaf(x.id) == z.id
    assert [m.id for m in conv.thread(z.id)] == [r.id, x.id, z.id]
