"""API response records (storage/responses.py): in their session, found by id, versioned, gone with the session."""

from __future__ import annotations

import json
import time

import pytest

from storage import (
    CorruptRecord,
    InvalidInput,
    NotFound,
    ResponseRecord,
    SchemaVersionError,
    Store,
    key,
    new_response_id,
)

pytestmark = pytest.mark.redis


def _record(store: Store, **kw: object) -> ResponseRecord:
    s = store.create_session("api")
    u = store.append_message(s.id, "user", "hi")
    a = store.append_message(s.id, "assistant", "hello", parent_id=u.id)
    fields = dict(id=new_response_id(), session_id=s.id, created_at=time.time(), status="completed", model="demo",
                  input_ids=[u.id], output_id=a.id, usage={"input_tokens": 5, "output_tokens": 2},
                  params={"truncation": "auto"}, metadata={"k": "v"})
    fields.update(kw)
    return ResponseRecord(**fields)  # type: ignore[arg-type]


def test_save_get_delete(store: Store) -> None:
    rec = _record(store)
    assert rec.input_ids == tuple(rec.input_ids) and rec.id.startswith("resp_")
    store.save_response(rec)
    assert store.get_response(rec.id) == rec
    assert store.session_responses(rec.session_id) == [rec]
    later = _record(store, session_id=rec.session_id, id=new_response_id(), previous_id=rec.id,
                    created_at=rec.created_at + 1, status="cancelled")
    store.save_response(later)
    assert [r.id for r in store.session_responses(rec.session_id)] == [rec.id, later.id]
    assert store.delete_response(rec.id) is True
    assert store.delete_response(rec.id) is False
    with pytest.raises(NotFound):
        store.get_response(rec.id)
    assert len(store.thread(rec.session_id)) == 2   # the messages stay


def test_deleting_the_session_deletes_its_responses(store: Store) -> None:
    rec = store.save_response(_record(store))
    store.delete_session(rec.session_id)
    with pytest.raises(NotFound):
        store.get_response(rec.id)
    assert store.connection.hget(key("responses"), rec.id) is None   # the stale index entry is dropped


def test_bad_records_are_refused(store: Store) -> None:
    with pytest.raises(InvalidInput, match="status"):
        _record(store, status="done")
    with pytest.raises(InvalidInput):
        _record(store, id="resp bad")
    with pytest.raises(NotFound):
        store.save_response(_record(store, session_id="nosuchsession"))
    rec = store.save_response(_record(store))
    where = key("resp", rec.session_id)
    raw = json.loads(store.connection.hget(where, rec.id))
    store.connection.hset(where, rec.id, json.dumps({**raw, "v": 99}))
    with pytest.raises(SchemaVersionError):
        store.get_response(rec.id)
    store.connection.hset(where, rec.id, "not json")
    with pytest.raises(CorruptRecord):
        store.get_response(rec.id)
    store.connection.hset(where, rec.id, json.dumps({**raw, "status": 3}))
    with pytest.raises(CorruptRecord):
        store.get_response(rec.id)
