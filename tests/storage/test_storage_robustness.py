"""Malformed data, oversize messages, key layout and deletion: clear errors, nothing else disturbed."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from storage import (
    CorruptRecord,
    InvalidInput,
    MessageTooLarge,
    ResponseRecord,
    SchemaVersionError,
    Store,
    StoreConfig,
    key,
    new_response_id,
    session_keys,
)
from storage.keys import GLOBAL_KINDS, SESSION_KINDS

pytestmark = pytest.mark.redis


def two_sessions(store: Store) -> tuple[str, str]:
    a = store.create_session("victim")
    b = store.create_session("bystander")
    for sid in (a.id, b.id):
        store.append_message(sid, "user", "hello")
        store.append_message(sid, "assistant", "hi")
    return a.id, b.id


def retype(r, k: str, mid: str, i: int, value: str) -> None:
    head, _, body = r.hget(k, mid).partition("\n")
    fields = head.split("\t")
    fields[i] = value
    r.hset(k, mid, "\t".join(fields) + "\n" + body)


@pytest.mark.parametrize("kind, damage, detail", [
    ("msgs", lambda r, k, mid: r.hset(k, mid, "{not our format"), "is not a record we wrote"),
    ("msgs", lambda r, k, mid: r.hset(k, mid, '{"role": "user", "content": "hi"}'), "is not a record we wrote"),
    ("msgs", lambda r, k, mid: r.hset(k, mid, b"\xff\xfe\n"), "is not a record we wrote"),
    ("msgs", lambda r, k, mid: retype(r, k, mid, 4, "robot"), "wrong value"),
    ("msgs", lambda r, k, mid: retype(r, k, mid, 6, "yesterday"), "is not a record we wrote"),
    ("msgs", lambda r, k, mid: retype(r, k, mid, 8, "-3"), "wrong value"),
    ("msgs", lambda r, k, mid: retype(r, k, mid, 9, "[1]"), "wrong value"),
    ("msgs", lambda r, k, mid: retype(r, k, mid, 0, "ghost-parent"), "missing parent 'ghost-parent'"),
    ("msgs", lambda r, k, mid: (r.delete(k), r.set(k, "foreign")), "is a Redis string, expected a hash"),
    ("meta", lambda r, k, mid: r.hset(k, "sampling", "[oops"), "field 'sampling' is not JSON"),
    ("meta", lambda r, k, mid: r.hdel(k, "title"), "field 'title' is missing"),
    ("meta", lambda r, k, mid: r.hset(k, "count", '"many"'), "field 'count' has the wrong type"),
    ("meta", lambda r, k, mid: r.hset(k, "tip", '"gone"'), "tip 'gone' is not a message"),
    ("live", lambda r, k, mid: (r.delete(k), r.rpush(k, "x")), "is a Redis list, expected a hash"),
])
def test_corrupt_record_names_the_key_and_spares_other_sessions(store: Store, backend, kind, damage,
                                                                 detail) -> None:
    victim, bystander = two_sessions(store)
    mid = store.thread(victim)[0].id
    damage(backend.client, key(kind, victim), mid)
    with pytest.raises(CorruptRecord) as info:
        store.load(victim)
    assert info.value.key == key(kind, victim)
    assert detail in str(info.value) and key(kind, victim) in str(info.value)
    if kind == "msgs" and "parent" not in detail and "Redis" not in detail:
        assert repr(mid) in str(info.value)  # the message is named too
    assert "\n" not in str(info.value)
    assert [m.content for m in store.thread(bystander)] == ["hello", "hi"]  # others still load
    page = store.list_sessions()
    assert bystander in [s.id for s in page.sessions]


def test_foreign_type_under_a_session_record(store: Store, backend) -> None:
    victim, bystander = two_sessions(store)
    backend.client.delete(key("meta", victim))
    backend.client.set(key("meta", victim), "I am not a hash")
    page = store.list_sessions()
    assert [s.id for s in page.sessions] == [bystander]
    assert len(page.errors) == 1 and key("meta", victim) in str(page.errors[0])
    with pytest.raises(CorruptRecord, match="not a Redis hash") as info:
        store.get_session(victim)
    assert info.value.key == key("meta", victim)
    with pytest.raises(CorruptRecord):
        store.append_message(victim, "user", "more")
    assert store.delete_session(victim)  # a broken session can still be deleted
    assert store.list_sessions().errors == ()


def test_newer_schema_is_refused_clearly(store: Store, backend) -> None:
    victim, bystander = two_sessions(store)
    backend.client.hset(key("meta", victim), "v", "7")
    with pytest.raises(SchemaVersionError, match="schema version 7.*upgrade chatcore") as info:
        store.get_session(victim)
    assert info.value.key == key("meta", victim)
    with pytest.raises(SchemaVersionError):
        store.append_message(victim, "user", "x")  # never writes old-format records into it
    page = store.list_sessions()
    assert [s.id for s in page.sessions] == [bystander] and isinstance(page.errors[0], SchemaVersionError)

    mid = store.thread(bystander)[1].id
    retype(backend.client, key("msgs", bystander), mid, 2, "2")
    with pytest.raises(SchemaVersionError, match=key("msgs", bystander)):
        store.load(bystander)


def test_oversize_message_is_refused(store: Store) -> None:
    s = store.create_session()
    limit = store.config.max_message_bytes
    assert limit == 8 * 1024 * 1024
    with pytest.raises(MessageTooLarge, match=f"over the {limit:,}-byte limit") as info:
        store.append_message(s.id, "user", "x" * (limit + 1))
    assert info.value.size == limit + 1
    with pytest.raises(MessageTooLarge):
        store.append_message(s.id, "user", "é" * (limit // 2 + 1))  # bytes, not characters
    with pytest.raises(MessageTooLarge):
        store.update_session(s.id, system_prompt="p" * (limit + 1))
    big = store.append_message(s.id, "user", "x" * limit)  # exactly the limit is fine
    assert store.get_message(s.id, big.id).content == "x" * limit
    assert store.get_session(s.id).message_count == 1


def test_message_limit_is_configurable(backend) -> None:
    store = backend.store(StoreConfig(max_message_bytes=10))
    s = store.create_session()
    store.append_message(s.id, "user", "0123456789")
    with pytest.raises(MessageTooLarge):
        store.append_message(s.id, "user", "0123456789a")
    w = store.begin_reply(s.id)
    w.write("01234")
    with pytest.raises(MessageTooLarge):
        w.write("567890")
    assert w.finish().content == "01234"  # the refused piece was not taken
    with pytest.raises(ValueError):
        StoreConfig(max_message_bytes=0)


def test_all_keys_come_from_key_and_share_a_slot(store: Store, backend) -> None:
    a, b = two_sessions(store)
    w = store.begin_reply(a)
    for sid in (a, b):
        names = session_keys(sid)
        assert names == [f"chatcore:{{{sid}}}:{kind}" for kind in SESSION_KINDS]
        assert len({key_slot(n.encode()) for n in names}) == 1  # one cluster slot per session
    allowed = {key(k, sid) for k in SESSION_KINDS for sid in (a, b)} | {key(k) for k in GLOBAL_KINDS}
    present = set(backend.client.scan_iter(match="*"))
    assert present <= allowed and key("live", a) in present
    for bad in ("", "a b", "a{b}", "a:b", "*", "x" * 65, "-lead"):
        with pytest.raises(InvalidInput):
            key("meta", bad)
    with pytest.raises(InvalidInput):
        key("nonsense", a)
    w.finish()


def test_delete_removes_every_key_of_the_session_and_nothing_else(store: Store, backend) -> None:
    a, b = two_sessions(store)
    store.pin(a, store.thread(a)[0].id)
    store.set_token_counts(a, {store.thread(a)[0].id: 3})
    store.begin_reply(a)  # a live streaming entry too
    store.save_response(ResponseRecord(new_response_id(), a, 0.0, "completed", "m"))  # and an API response
    backend.client.set("unrelated:key", "keep me")
    backend.client.hset(f"chatcore:{{{a}x}}:meta", "v", "1")  # a look-alike id: not ours to delete
    before = set(backend.client.scan_iter(match="*"))
    own = {n for n in before if f"{{{a}}}" in n}
    assert own == set(session_keys(a))  # every kind existed
    assert store.delete_session(a) is True
    after = set(backend.client.scan_iter(match="*"))
    assert after == before - own
    assert backend.client.zrange(key("index"), 0, -1) == [b]
    assert store.delete_session(a) is False


def test_non_utf8_bytes_with_a_decoding_client(store: Store, backend) -> None:
    victim, bystander = two_sessions(store)
    backend.client.hset(key("msgs", victim), "junk", b"\xff\xfe\n")
    decoding = Store(backend.client)  # a client made with decode_responses=True
    with pytest.raises(CorruptRecord, match="not UTF-8"):
        decoding.load(victim)
    assert [m.content for m in decoding.thread(bystander)] == ["hello", "hi"]
    with pytest.raises(CorruptRecord, match="'junk'"):
        store.load(victim)  # the store's own (bytes) client names the field
