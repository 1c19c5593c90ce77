"""Stored API responses (`chatcore serve`'s `/v1/responses`): where each one sits in a session's message tree.

A response record lives in its session (`chatcore:{sid}:resp`, response id -> JSON record), so deleting the
session deletes its responses; a global hash (`chatcore:responses`, response id -> session id) finds it by id
alone. The text is not copied: `input_ids` and `output_id` name the session's messages (the user's input and
the reply), so a response reads what the session holds, and continuing it (`previous_response_id`) means
appending under `output_id`, a new branch when something else already follows it.

    rec = ResponseRecord(id=new_response_id(), session_id=sid, created_at=time.time(), status="completed",
                         model="demo", input_ids=(user_id,), output_id=reply_id)
    store.save_response(rec)
    store.get_response(rec.id)          # NotFound once deleted (or its session is)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .base import StoreBase
from .codec import dumps, text
from .errors import CorruptRecord, InvalidInput, NotFound, SchemaVersionError
from .keys import check_id, key, new_id

RESPONSE_SCHEMA = 1
RESPONSE_STATUSES = ("completed", "incomplete", "cancelled", "failed", "in_progress")


def new_response_id() -> str:
    """A fresh response id: `resp_` + a time-sortable id."""
    return "resp_" + new_id()


@dataclass(frozen=True)
class ResponseRecord:
    """One stored response. `input_ids`: the messages this request added (oldest first); `output_id`: the
    reply (None when generation failed before it started); `previous_id`: the response it continued.
    `usage`, `params` (the request's sampling settings, truncation, tools), `metadata` (the caller's strings),
    `error` ({"code", "message"} of a failed one) and `incomplete_reason` ("max_output_tokens", ...) are plain
    JSON data."""

    id: str
    session_id: str
    created_at: float
    status: str
    model: str
    input_ids: tuple[str, ...] = ()
    output_id: str | None = None
    previous_id: str | None = None
    instructions: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    incomplete_reason: str | None = None
    schema: int = RESPONSE_SCHEMA

    def __post_init__(self) -> None:
        check_id(self.id, "response")
        check_id(self.session_id, "session")
        if self.status not in RESPONSE_STATUSES:
            raise InvalidInput(f"response status must be one of {', '.join(RESPONSE_STATUSES)}, got {self.status!r}")
        object.__setattr__(self, "input_ids", tuple(self.input_ids))


def encode_response(rec: ResponseRecord) -> str:
    fields = asdict(rec)
    fields.pop("schema")
    fields["input_ids"] = list(rec.input_ids)
    return dumps({"v": RESPONSE_SCHEMA, **fields})


def decode_response(where: str, raw: bytes | str) -> ResponseRecord:
    try:
        fields = json.loads(raw)
    except ValueError:
        raise CorruptRecord(where, "a response record is not JSON") from None
    if not isinstance(fields, dict):
        raise CorruptRecord(where, "a response record is not a JSON object")
    version = fields.pop("v", None)
    if type(version) is not int or version < 1:
        raise CorruptRecord(where, f"missing or invalid response schema version {version!r}")
    if version > RESPONSE_SCHEMA:
        raise SchemaVersionError(where, version, RESPONSE_SCHEMA)
    try:
        return ResponseRecord(**fields, schema=RESPONSE_SCHEMA)
    except (TypeError, InvalidInput) as exc:
        raise CorruptRecord(where, f"a response record has a bad field ({exc})") from None


class ResponsesMixin(StoreBase):
    def save_response(self, rec: ResponseRecord) -> ResponseRecord:
        """Write (or overwrite) `rec` in its session and in the id index. The session must exist."""
        raw = encode_response(rec)
        with self._guard(rec.session_id):
            if not self.connection.exists(key("meta", rec.session_id)):
                raise NotFound("session", rec.session_id, "the response's conversation was deleted")
            pipe = self.connection.pipeline(transaction=False)
            pipe.hset(key("resp", rec.session_id), rec.id, raw)
            pipe.hset(key("responses"), rec.id, rec.session_id)
            pipe.execute()
        return rec

    def get_response(self, response_id: str) -> ResponseRecord:
        """The stored response `response_id`; NotFound if it was never stored, was deleted, or its session was."""
        check_id(response_id, "response")
        with self._guard():
            sid = self.connection.hget(key("responses"), response_id)
        if sid is None:
            raise NotFound("response", response_id)
        sid = text(sid)
        where = key("resp", sid)
        with self._guard(sid):
            raw = self.connection.hget(where, response_id)
        if raw is None:
            with self._guard():
                self.connection.hdel(key("responses"), response_id)  # its session went: drop the stale entry
            raise NotFound("response", response_id)
        return decode_response(where, raw)

    def delete_response(self, response_id: str) -> bool:
        """Forget the response record (the session's messages stay). False if there was none."""
        try:
            rec = self.get_response(response_id)
        except NotFound:
            return False
        with self._guard(rec.session_id):
            pipe = self.connection.pipeline(transaction=False)
            pipe.hdel(key("resp", rec.session_id), response_id)
            pipe.hdel(key("responses"), response_id)
            gone, _ = pipe.execute()
        return bool(gone)

    def session_responses(self, session_id: str) -> list[ResponseRecord]:
        """Every stored response of the session, oldest first."""
        where = key("resp", session_id)
        with self._guard(session_id):
            raws = self.connection.hvals(where)
        return sorted((decode_response(where, r) for r in raws), key=lambda r: (r.created_at, r.id))
