"""`Store`: the whole storage API in one class (sessions, messages, branches, streaming, search)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from .codec import encode_message, encode_session
from .errors import Conflict, InvalidInput, MessageTooLarge
from .keys import check_id, key, new_id
from .messages import TIP, MessagesMixin
from .records import ROLES, STATUSES, Conversation, SearchHit, Session
from .responses import ResponsesMixin
from .search import search as _search
from .writer import ReplyWriter

_SURROGATE = re.compile("[\ud800-\udfff]")


class Store(ResponsesMixin, MessagesMixin):
    """Sessions in Redis (and the API responses stored in them). Hand it a redis-py client (or use
    `storage.open_store()`).

    Everything it returns is a frozen dataclass (`Session`, `Message`, `Conversation`, ...);
    everything it raises is a `storage.errors.StorageError`.
    """

    def begin_reply(self, session_id: str, *, parent_id: Any = TIP, message_id: str | None = None,
                    role: str = "assistant", extra: Mapping[str, Any] | None = None,
                    before: Callable[[], Any] | None = None) -> ReplyWriter:
        """Start a streaming reply under `parent_id` (default: the tip) and save it at once as
        `streaming`. If Redis is unreachable the writer still works in memory (see its `error`).
        `before`: an idempotent write that must land before the reply's first (the parent itself)."""
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        writer = ReplyWriter(self, session_id, parent_id if parent_id is TIP else
                             (None if parent_id is None else check_id(parent_id)),
                             check_id(message_id) if message_id is not None else new_id(),
                             role=role, extra=extra, before=before)
        writer.start()
        return writer

    def regenerate(self, session_id: str, message_id: str, *, new_message_id: str | None = None) -> ReplyWriter:
        """Start a new reply as a sibling of assistant message `message_id` (same parent); the old
        reply stays as another branch."""
        old = self.get_message(session_id, message_id)
        if old.role != "assistant":
            raise InvalidInput(f"message {message_id!r} is a {old.role} message; only replies can be "
                               "regenerated (edit it instead)")
        return self.begin_reply(session_id, parent_id=old.parent_id, message_id=new_message_id)

    def search(self, query: str, *, limit: int = 20, content: bool = True) -> list[SearchHit]:
        """Sessions matching `query` in title, tags or (with `content`) message text."""
        return _search(self, query, limit=limit, content=content)

    def import_conversation(self, conv: Conversation, *, session_id: str | None = None) -> Session:
        """Write a whole conversation exactly as given (ids, branches, times, statuses, tokens,
        pins, summary). Keeps its session id unless taken (then a fresh one) or `session_id` is given.
        A reply that was still streaming is stored as incomplete."""
        self.check_import(conv)
        wanted = check_id(session_id, "session") if session_id is not None else conv.session.id
        try:
            return self._import_as(conv, wanted)
        except Conflict:
            if session_id is not None:
                raise
            return self._import_as(conv, new_id())

    def check_import(self, conv: Conversation) -> None:
        """Raise what `import_conversation` would refuse `conv` for (InvalidInput, MessageTooLarge), writing
        nothing: its structure, message sizes, and every field encoded as it would be stored."""
        _validate(conv, self.config.max_message_bytes)
        for field in [*encode_session(conv.session).values(), *map(encode_message, conv.messages)]:
            if _SURROGATE.search(field):
                raise InvalidInput("a string holds a lone surrogate, which is not text")

    def _import_as(self, conv: Conversation, sid: str) -> Session:
        session = replace(conv.session, id=sid, message_count=len(conv.messages))
        messages = [replace(m, session_id=sid, status="incomplete" if m.status == "streaming" else m.status)
                    for m in conv.messages]
        names = {k: key(k, sid) for k in ("meta", "msgs")}

        def body(pipe: Any) -> Session:
            if pipe.exists(names["meta"], names["msgs"]):
                raise Conflict(f"session {sid!r} already exists; import it under another id")
            pipe.multi()
            next_seq = messages[-1].seq + 1 if messages else 0
            pipe.hset(names["meta"], mapping={**encode_session(session), "seq": str(next_seq)})
            for i in range(0, len(messages), 1000):
                pipe.hset(names["msgs"], mapping={m.id: encode_message(m) for m in messages[i:i + 1000]})
            return session
        out = self._transact(sid, body, attempts=3)
        with self._guard(sid):
            self.connection.zadd(key("index"), {sid: session.updated_at})
        return out


def _validate(conv: Conversation, limit: int) -> None:
    """Refuse a conversation whose structure we would not have written ourselves."""
    s = conv.session
    check_id(s.id, "session")
    seen: set[str] = set()
    last_seq = -1
    for m in conv.messages:
        check_id(m.id)
        if m.id in seen:
            raise InvalidInput(f"message id {m.id!r} appears twice")
        if m.seq <= last_seq:
            raise InvalidInput(f"message {m.id!r} is out of order (seq {m.seq} after {last_seq}); list "
                               "messages in the order they were added")
        last_seq = m.seq
        if m.parent_id is not None and m.parent_id not in seen:
            raise InvalidInput(f"message {m.id!r} comes before its parent {m.parent_id!r} (or the parent "
                               "is missing); list parents first")
        if m.role not in ROLES or m.status not in STATUSES or not isinstance(m.content, str):
            raise InvalidInput(f"message {m.id!r} has an invalid role, status or content")
        if len(m.content.encode("utf-8")) > limit:
            raise MessageTooLarge(len(m.content.encode("utf-8")), limit)
        seen.add(m.id)
    for ref, what in [(s.tip_id, "tip"), *((p, "pinned message") for p in s.pinned)]:
        if ref is not None and ref not in seen:
            raise InvalidInput(f"{what} {ref!r} is not one of the session's messages")
    if s.summary is not None and not {s.summary.first_id, s.summary.last_id} <= seen:
        raise InvalidInput("the summary covers messages that are not in the session")
