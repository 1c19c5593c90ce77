"""Two processes appending to one session at once: nothing lost, nothing doubled, turns intact."""

from __future__ import annotations

import pytest

from storage import Store, key

pytestmark = pytest.mark.redis

TURNS = 150  # per process: 300 messages each, 600 in all


def test_two_writers_one_session(store: Store, backend) -> None:
    s = store.create_session("shared")
    procs = [backend.run("append", s.id, tag, str(TURNS)) for tag in ("A", "B")]
    for p in procs:  # both connected...
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    for p in procs:  # ...then both start at once
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0 and out.strip() == "done", err

    conv = store.load(s.id)
    ids = [m.id for m in conv.messages]
    expected = {f"{tag}-{kind}{i}" for tag in "AB" for kind in "ua" for i in range(TURNS)}
    assert len(ids) == len(set(ids)) == 4 * TURNS  # every message exactly once
    assert set(ids) == expected
    assert backend.client.hlen(key("msgs", s.id)) == 4 * TURNS
    assert sorted(m.seq for m in conv.messages) == list(range(4 * TURNS))  # one sequence, no gaps
    assert conv.session.message_count == 4 * TURNS

    seqs = {tag: [m.seq for m in conv.messages if m.id.startswith(tag)] for tag in "AB"}
    assert min(seqs["A"]) < max(seqs["B"]) and min(seqs["B"]) < max(seqs["A"])  # they really overlapped

    by_id = conv.by_id
    for tag in "AB":
        own = [m for m in conv.messages if m.id.startswith(tag)]
        # each writer's messages were stored in the order it wrote them...
        assert [m.id for m in own] == [f"{tag}-{k}{i}" for i in range(TURNS) for k in "ua"]
        for i in range(TURNS):
            u, a = by_id[f"{tag}-u{i}"], by_id[f"{tag}-a{i}"]
            assert u.content == f"{tag} asks {i}" and u.role == "user"
            assert a.content == f"{tag} answers {i}" and a.role == "assistant" and a.status == "complete"
            # ...and every reply directly follows its own question: a turn is never split
            assert a.parent_id == u.id
            # a question follows whatever was the tip when it was written: an earlier message
            assert u.parent_id is None or by_id[u.parent_id].seq < u.seq

    # the tree is whole: every path from a leaf to the root alternates question / answer
    for leaf in (m for m in conv.messages if not conv.children(m.id)):
        path = conv.thread(leaf.id)
        assert path[0].parent_id is None
        for prev, cur in zip(path, path[1:], strict=False):
            if cur.role == "assistant":
                assert prev.id == cur.id.replace("-a", "-u")


@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_turns_become_sibling_branches(store: Store, backend, writers: int) -> None:
    """Writers sending to the tip at once: a user message always attaches to a complete turn (or
    the root), never under another writer's user message still waiting for its reply."""
    s = store.create_session("shared")
    tags = "ABCD"[:writers]
    turns = 60
    procs = [backend.run("append", s.id, tag, str(turns)) for tag in tags]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "done", err
    conv = store.load(s.id)
    by_id = conv.by_id
    users = [m for m in conv.messages if m.role == "user"]
    assert len(users) == writers * turns
    under_user = [m.id for m in users if m.parent_id is not None and by_id[m.parent_id].role == "user"]
    assert under_user == []
    for m in users:  # attached to a turn that was complete, or being completed, when it was written
        assert m.parent_id is None or by_id[m.parent_id].role == "assistant"
    for m in conv.messages:
        if m.role == "assistant":
            assert m.parent_id == m.id.replace("-a", "-u")


def test_a_user_message_after_a_failed_reply_is_a_sibling(store: Store) -> None:
    """The previous user message got no reply (it failed to store): the next one does not go under it."""
    s = store.create_session("s")
    u1 = store.append_message(s.id, "user", "one")
    a1 = store.append_message(s.id, "assistant", "reply", parent_id=u1.id)
    u2 = store.append_message(s.id, "user", "two")
    u3 = store.append_message(s.id, "user", "three", parent_id=u2.id)
    assert u3.parent_id == a1.id == store.get_message(s.id, u3.id).parent_id
    assert store.get_session(s.id).tip_id == u3.id
    first = store.append_message(s.id, "user", "root")
    assert first.parent_id == a1.id  # the tip was u3, a user message: the new one is its sibling
