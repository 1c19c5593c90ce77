"""Key names (all from `key()`), identifiers and their validation.

Every per-session key carries the session id as a Redis Cluster hash tag (`{id}`), so one session
lives on one shard and our Lua scripts / MULTI blocks only ever touch one slot. The only key outside
a session is the activity index, which is a derived structure (`Store.reindex()` rebuilds it).
"""

from __future__ import annotations

import re
import secrets
import time

from .errors import InvalidInput

PREFIX = "chatcore"

#: Kinds of per-session keys. `meta` is a hash (the session record), `msgs` a hash of message id ->
#: message record, `live` a hash of the replies being streamed (message id -> heartbeat), `resp` a hash of
#: the session's stored API responses (response id -> record, storage/responses.py).
SESSION_KINDS = ("meta", "msgs", "live", "resp")
#: Global kinds: `index` is a sorted set of session ids scored by last activity; `responses` a hash of
#: response id -> the session holding it (derived: a session's deletion leaves entries that read as gone).
GLOBAL_KINDS = ("index", "responses")

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def key(kind: str, session_id: str | None = None) -> str:
    """The Redis key for `kind`: `chatcore:{<session_id>}:<kind>`, or `chatcore:<kind>` for globals."""
    if kind in SESSION_KINDS:
        if session_id is None:
            raise InvalidInput(f"key kind {kind!r} needs a session id")
        return f"{PREFIX}:{{{check_id(session_id, 'session')}}}:{kind}"
    if kind in GLOBAL_KINDS:
        if session_id is not None:
            raise InvalidInput(f"key kind {kind!r} is global; it takes no session id")
        return f"{PREFIX}:{kind}"
    raise InvalidInput(f"unknown key kind {kind!r}; expected one of {SESSION_KINDS + GLOBAL_KINDS}")


def session_keys(session_id: str) -> list[str]:
    """Every key that belongs to one session (what `delete_session` removes)."""
    return [key(kind, session_id) for kind in SESSION_KINDS]


def session_pattern() -> str:
    """A SCAN pattern matching every session's `meta` key (used to rebuild the index)."""
    return f"{PREFIX}:{{*}}:meta"


def session_id_from_meta_key(name: str) -> str | None:
    m = re.fullmatch(re.escape(PREFIX) + r":\{([^{}]+)\}:meta", name)
    return m.group(1) if m and _ID.match(m.group(1)) else None


def check_id(value: object, what: str = "message") -> str:
    """Return `value` if it is a valid id (1-64 of A-Z a-z 0-9 _ . -, starting alphanumeric)."""
    if not isinstance(value, str) or not _ID.match(value):
        raise InvalidInput(
            f"invalid {what} id {value!r}: use 1-64 letters, digits, '_', '.', '-' (starting with a "
            "letter or digit)"
        )
    return value


def new_id() -> str:
    """A fresh 24-character id: 11 hex digits of milliseconds (sorts by time) + 13 random hex digits
    (52 random bits: even a 10,000-message import made in one millisecond will not collide)."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(7)[:13]}"
