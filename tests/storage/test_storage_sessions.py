"""Session records: settings, pins, summary, tags, listing by activity, search, delete, reindex."""

from __future__ import annotations

import pytest

from storage import UNSET, Conflict, InvalidInput, NotFound, Store, key

pytestmark = pytest.mark.redis


def test_create_get_update(store: Store) -> None:
    s = store.create_session("Trip", model="smollm2", system_prompt="Be terse.",
                             sampling={"temperature": 0.7, "seed": 3, "stop": ["\n\n"]}, tags=["travel", "may"])
    got = store.get_session(s.id)
    assert got == s
    assert got.sampling == {"temperature": 0.7, "seed": 3, "stop": ["\n\n"]}
    assert got.tags == ("travel", "may") and got.message_count == 0 and got.tip_id is None

    u = store.update_session(s.id, title="Trip to Oslo", sampling={"temperature": 0.2}, tags=["oslo"])
    assert (u.title, u.sampling, u.tags, u.model, u.system_prompt) == (
        "Trip to Oslo", {"temperature": 0.2}, ("oslo",), "smollm2", "Be terse.")
    assert u.updated_at >= s.updated_at
    cleared = store.update_session(s.id, model=None, system_prompt=None, title=UNSET)
    assert cleared.model is None and cleared.system_prompt is None and cleared.title == "Trip to Oslo"
    assert store.get_session(s.id) == cleared


def test_bad_settings_are_refused(store: Store) -> None:
    s = store.create_session()
    with pytest.raises(InvalidInput, match="plain JSON"):
        store.update_session(s.id, sampling={"temperature": object()})
    with pytest.raises(InvalidInput, match="plain JSON"):
        store.update_session(s.id, sampling={"temperature": float("nan")})
    with pytest.raises(InvalidInput, match="tags"):
        store.update_session(s.id, tags="one-string")
    with pytest.raises(InvalidInput, match="title"):
        store.create_session(title=3)  # type: ignore[arg-type]
    assert store.get_session(s.id) == s


def test_missing_session(store: Store) -> None:
    with pytest.raises(NotFound, match="no session 'nope'"):
        store.get_session("nope")
    with pytest.raises(NotFound):
        store.update_session("nope", title="x")
    with pytest.raises(NotFound):
        store.append_message("nope", "user", "hi")
    assert store.delete_session("nope") is False


def test_explicit_id_conflict(store: Store) -> None:
    store.create_session("a", session_id="fixed-id")
    with pytest.raises(Conflict, match="already exists"):
        store.create_session("b", session_id="fixed-id")
    assert store.get_session("fixed-id").title == "a"


def test_pins_and_summary(store: Store) -> None:
    s = store.create_session()
    a = store.append_message(s.id, "user", "a")
    b = store.append_message(s.id, "assistant", "b")
    assert store.pin(s.id, a.id).pinned == (a.id,)
    assert store.pin(s.id, b.id).pinned == (a.id, b.id)
    assert store.pin(s.id, a.id).pinned == (a.id, b.id)  # pinning twice is a no-op
    assert store.unpin(s.id, a.id).pinned == (b.id,)
    with pytest.raises(NotFound, match="message 'zzz'"):
        store.pin(s.id, "zzz")

    sm = store.set_summary(s.id, "They said hello.", a.id, b.id, tokens=5).summary
    assert sm is not None and (sm.text, sm.first_id, sm.last_id, sm.tokens) == ("They said hello.", a.id, b.id, 5)
    assert store.get_session(s.id).summary == sm
    with pytest.raises(NotFound):
        store.set_summary(s.id, "x", a.id, "missing")
    assert store.clear_summary(s.id).summary is None


def test_list_by_last_activity_with_paging(store: Store) -> None:
    ids = [store.create_session(f"s{i}").id for i in range(7)]
    page = store.list_sessions(limit=3)
    assert [s.id for s in page.sessions] == ids[::-1][:3]
    assert page.total == 7 and page.next_offset == 3 and not page.errors
    store.append_message(ids[0], "user", "wake up")  # the oldest becomes the most recent
    first = store.list_sessions(limit=3)
    assert first.sessions[0].id == ids[0]
    seen = []
    offset: int | None = 0
    while offset is not None:
        p = store.list_sessions(offset=offset, limit=3)
        seen += [s.id for s in p.sessions]
        offset = p.next_offset
    assert seen == [ids[0]] + ids[1:][::-1]
    assert store.count_sessions() == 7
    with pytest.raises(InvalidInput):
        store.list_sessions(limit=0)


def test_search_title_tags_content(store: Store) -> None:
    a = store.create_session("Groceries for the Week", tags=["home"])
    b = store.create_session("Physics", tags=["Study"])
    store.append_message(b.id, "user", 'What is "Straße" in\nEnglish?')
    m = store.append_message(b.id, "assistant", "Quantum CHROMODYNAMICS explains the strong force.")
    store.create_session("Empty")
    assert [h.session.id for h in store.search("groceries")] == [a.id]
    assert [h.session.id for h in store.search("study")] == [b.id]
    hits = store.search("chromodynamics")
    assert [(h.session.id, h.message_id) for h in hits] == [(b.id, m.id)]
    assert "CHROMODYNAMICS" in hits[0].snippet
    assert store.search('"straße" in\nenglish')[0].session.id == b.id  # quotes and newlines
    assert store.search("STRASSE")[0].session.id == b.id  # Unicode case folding: ß == ss
    assert store.search("no such words") == []
    assert store.search("chromodynamics", content=False) == []
    assert store.search("e", limit=2).__len__() == 2
    with pytest.raises(InvalidInput):
        store.search("  ")


def test_reindex_recovers_a_lost_index_entry(store: Store, backend) -> None:
    a = store.create_session("a")
    b = store.create_session("b")
    backend.client.zrem(key("index"), a.id)
    backend.client.zadd(key("index"), {"ghost": 1.0})
    page = store.list_sessions()
    assert [s.id for s in page.sessions] == [b.id]  # the ghost (no record) is skipped quietly
    assert store.reindex() == 2
    assert sorted(s.id for s in store.list_sessions().sessions) == sorted([a.id, b.id])
    assert store.count_sessions() == 2


def test_match_session_ids(store: Store) -> None:
    a = store.create_session(session_id="abc123")
    store.create_session(session_id="abd999")
    assert store.match_session_ids("abc") == [a.id]
    assert sorted(store.match_session_ids("ab")) == ["abc123", "abd999"]
    assert store.match_session_ids("abc123") == ["abc123"]
    assert store.match_session_ids("zz") == []
