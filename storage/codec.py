"""Records <-> Redis values. Every record carries a schema version; anything else is refused clearly.

Session record: a hash whose every field holds a JSON value (`v`, `id`, `title`, `created`,
`updated`, `model`, `system_prompt`, `sampling`, `pinned`, `summary`, `tags`, `tip`, `count`).
Message record: one compact JSON object per message, `parent` first so the append script can
prepend the parent it resolves atomically without decoding or re-encoding anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from .errors import CorruptRecord, InvalidInput, SchemaVersionError
from .keys import check_id
from .models import ROLES, STATUSES, Message, Session, Summary

SCHEMA = 1
#: version -> function upgrading a decoded record of that version by one step.
MIGRATIONS_SESSION: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
MIGRATIONS_MESSAGE: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
#: OpenAI-style field names that may not be used in `extra` (they are ours).
RESERVED = frozenset(
    {"id", "parent", "parent_id", "role", "content", "status", "created", "created_at", "updated",
     "updated_at", "tokens", "seq", "v", "extra", "session_id"}
)

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_loads = json.loads


def dumps(value: Any) -> str:
    try:
        return _dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"value is not plain JSON data ({exc}); use str/int/float/bool/None/list/dict")\
            from None


def text(value: bytes | str) -> str:
    """A reply as str. Undecodable bytes become U+FFFD (ids that then match nothing are reported as
    corrupt where they are used); records themselves are decoded strictly by the JSON parser."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _strict(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


# ----------------------------------------------------------------------------- versions

def _upgrade(key: str, rec: dict[str, Any], version: object, migrations: Mapping[int, Callable]) -> dict:
    if type(version) is not int or version < 1:
        raise CorruptRecord(key, f"missing or invalid schema version {version!r}")
    if version > SCHEMA:
        raise SchemaVersionError(key, version, SCHEMA)
    while version < SCHEMA:
        step = migrations.get(version)
        if step is None:
            raise SchemaVersionError(key, version, SCHEMA)
        rec = step(rec)
        version += 1
    return rec


# ----------------------------------------------------------------------------- sessions

def encode_session(s: Session) -> dict[str, str]:
    summary = None
    if s.summary is not None:
        summary = {"text": s.summary.text, "first_id": s.summary.first_id, "last_id": s.summary.last_id,
                   "tokens": s.summary.tokens, "created_at": s.summary.created_at}
    return {
        "v": str(SCHEMA), "id": dumps(s.id), "title": dumps(s.title), "created": dumps(s.created_at),
        "updated": dumps(s.updated_at), "model": dumps(s.model), "system_prompt": dumps(s.system_prompt),
        "sampling": dumps(s.sampling), "pinned": dumps(list(s.pinned)), "summary": dumps(summary),
        "tags": dumps(list(s.tags)), "tip": dumps(s.tip_id), "count": str(s.message_count),
    }


def _field(key: str, raw: Mapping[str, str], name: str, kinds: tuple[type, ...]) -> Any:
    if name not in raw:
        raise CorruptRecord(key, f"field {name!r} is missing")
    try:
        value = _loads(raw[name])
    except ValueError:
        raise CorruptRecord(key, f"field {name!r} is not JSON: {raw[name][:40]!r}") from None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise CorruptRecord(key, f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _str_list(key: str, value: list, name: str) -> tuple[str, ...]:
    if not all(isinstance(x, str) for x in value):
        raise CorruptRecord(key, f"field {name!r} must be a list of strings")
    return tuple(value)


def decode_session(key: str, raw_hash: Mapping[bytes | str, bytes | str]) -> Session:
    """Decode a session hash (as HGETALL returns it); raise CorruptRecord / SchemaVersionError."""
    try:
        raw = {_strict(k): _strict(v) for k, v in raw_hash.items()}
    except UnicodeDecodeError:
        raise CorruptRecord(key, "holds bytes that are not UTF-8") from None
    raw = _upgrade(key, raw, _field(key, raw, "v", (int,)), MIGRATIONS_SESSION)
    num = (int, float)
    summary = _field(key, raw, "summary", (dict, type(None)))
    if summary is not None:
        try:
            summary = Summary(text=summary["text"], first_id=summary["first_id"],
                              last_id=summary["last_id"], tokens=summary.get("tokens"),
                              created_at=float(summary.get("created_at", 0.0)))
        except (KeyError, TypeError, ValueError):
            raise CorruptRecord(key, "field 'summary' is not a summary object") from None
    count = _field(key, raw, "count", (int,))
    return Session(
        id=check_id(_field(key, raw, "id", (str,)), "session"),
        title=_field(key, raw, "title", (str,)),
        created_at=float(_field(key, raw, "created", num)),
        updated_at=float(_field(key, raw, "updated", num)),
        model=_field(key, raw, "model", (str, type(None))),
        system_prompt=_field(key, raw, "system_prompt", (str, type(None))),
        sampling=_field(key, raw, "sampling", (dict,)),
        pinned=_str_list(key, _field(key, raw, "pinned", (list,)), "pinned"),
        summary=summary,
        tags=_str_list(key, _field(key, raw, "tags", (list,)), "tags"),
        tip_id=_field(key, raw, "tip", (str, type(None))),
        message_count=count,
        schema=SCHEMA,
    )


# ----------------------------------------------------------------------------- messages

def message_rest(m: Message) -> str:
    """The message record without its leading `{"parent":...,` (the append script prepends it)."""
    rec: dict[str, Any] = {"id": m.id, "role": m.role, "content": m.content, "status": m.status,
                           "created": m.created_at, "updated": m.updated_at, "v": SCHEMA}
    if m.extra:
        rec["extra"] = m.extra
    return dumps(rec)[1:]


def encode_message(m: Message) -> str:
    return '{"parent":' + dumps(m.parent_id) + "," + message_rest(m)


def decode_message(key: str, field: str, session_id: str, raw: bytes | str, seq: int = -1,
                   tokens: int | None = None) -> Message:
    """Decode one stored message record (hash `key`, field `field`); refuse anything malformed."""
    try:
        rec = _loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CorruptRecord(key, f"message {field!r} is not JSON") from None
    if type(rec) is not dict:
        raise CorruptRecord(key, f"message {field!r} is a JSON {type(rec).__name__}, not an object")
    v = rec.get("v")
    if v != SCHEMA:
        rec = _upgrade(key, rec, v, MIGRATIONS_MESSAGE)
    try:
        mid, parent, role, content = rec["id"], rec["parent"], rec["role"], rec["content"]
        status, created, updated = rec["status"], rec["created"], rec["updated"]
        extra = rec.get("extra") or {}
    except KeyError as exc:
        raise CorruptRecord(key, f"message {field!r} lacks field {exc.args[0]!r}") from None
    if (mid != field or not (parent is None or type(parent) is str) or role not in ROLES
            or type(content) is not str or status not in STATUSES or type(extra) is not dict
            or not isinstance(created, (int, float)) or not isinstance(updated, (int, float))):
        raise CorruptRecord(key, f"message {field!r} has a field of the wrong type or value")
    return Message(mid, session_id, role, content, parent, status, float(created), float(updated),
                   tokens, seq, extra)


def decode_tokens(key: str, raw: bytes | str) -> int:
    try:
        n = int(raw)
    except ValueError:
        raise CorruptRecord(key, f"token count {text(raw)[:20]!r} is not an integer") from None
    if n < 0:
        raise CorruptRecord(key, f"token count {n} is negative")
    return n


def check_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{what} must be a finite number, got {value!r}")
    return float(value)
