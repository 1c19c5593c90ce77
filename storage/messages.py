"""Messages: idempotent appends, branches (edit / regenerate), the tip, loading, deletion."""

from __future__ import annotations

import gc
import hashlib
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Any

from . import tree
from .base import live_value, writer_alive
from .codec import (
    RESERVED,
    SCHEMA,
    check_number,
    decode_message,
    decode_messages,
    decode_session,
    dumps,
    encode_session,
    message_header,
    message_rest,
    text,
)
from .errors import Conflict, CorruptRecord, InvalidInput, NotFound, SchemaVersionError
from .keys import check_id, key, new_id
from .records import ROLES, STATUSES, Conversation, Message
from .scripts import APPEND, SET_HEADERS, SET_TIP
from .sessions import SessionsMixin


class _Tip:
    def __repr__(self) -> str:
        return "TIP"


#: `parent_id=TIP`: attach to the session's current tip, resolved atomically by Redis.
TIP: Any = _Tip()
_BATCH = 500


@dataclass(frozen=True)
class NewMessage:
    """A message to append. `parent_id`: TIP (default), None (a new root) or a message id."""

    role: str
    content: str
    parent_id: Any = TIP
    message_id: str | None = None
    status: str = "complete"
    tokens: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    created_at: float | None = None


class MessagesMixin(SessionsMixin):
    # ------------------------------------------------------------------ append

    def append_message(self, session_id: str, role: str, content: str, *, parent_id: Any = TIP,
                       message_id: str | None = None, status: str = "complete", tokens: int | None = None,
                       extra: Mapping[str, Any] | None = None) -> Message:
        """Append one message (it becomes the tip). Idempotent: re-sending the same `message_id`
        returns the stored message instead of adding a second one."""
        return self.append_many(session_id, [NewMessage(role, content, parent_id, message_id, status,
                                                        tokens, extra or {})])[0]

    def append_many(self, session_id: str, items: Sequence[NewMessage]) -> list[Message]:
        """Append messages in order, in one round trip per 500; TIP-parented ones chain one after
        another. Each batch of 500 is atomic (all or nothing)."""
        out: list[Message] = []
        for i in range(0, len(items), _BATCH):
            out += self._append(session_id, items[i:i + _BATCH])
        return out

    def _draft(self, session_id: str, item: NewMessage, now: float) -> tuple[Message, str, str]:
        if item.role not in ROLES:
            raise InvalidInput(f"role must be one of {', '.join(ROLES)}, got {item.role!r}")
        if item.status not in STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(STATUSES)}, got {item.status!r}")
        if not isinstance(item.content, str):
            raise InvalidInput(f"content must be a string, got {type(item.content).__name__}")
        if item.tokens is not None and (isinstance(item.tokens, bool) or not isinstance(item.tokens, int)
                                        or item.tokens < 0):
            raise InvalidInput(f"tokens must be a non-negative int or None, got {item.tokens!r}")
        extra = dict(item.extra)
        clash = RESERVED.intersection(extra)
        if clash:
            raise InvalidInput(f"extra fields {sorted(clash)} are reserved; rename them")
        self._check_size(len(item.content.encode("utf-8")) + (len(dumps(extra)) if extra else 0))
        if item.parent_id is TIP:
            mode, parent = "tip", ""
        elif item.parent_id is None:
            mode, parent = "root", ""
        else:
            mode, parent = "id", check_id(item.parent_id)
        mid = check_id(item.message_id) if item.message_id is not None else new_id()
        created = now if item.created_at is None else check_number(item.created_at, "created_at")
        msg = Message(mid, session_id, item.role, item.content, None, item.status, created, created,  # type: ignore[arg-type]
                      item.tokens, -1, extra)
        return msg, mode, parent

    def _append(self, session_id: str, items: Sequence[NewMessage]) -> list[Message]:
        now = time.time()
        drafts = [self._draft(session_id, it, now) for it in items]
        updated = max([now] + [m.created_at for m, _, _ in drafts])
        args: list[Any] = [str(SCHEMA), dumps(updated), len(drafts)]
        for m, mode, parent in drafts:
            args += [m.id, mode, parent, message_rest(m), live_value() if m.status == "streaming" else ""]
        names = [key(k, session_id) for k in ("meta", "msgs", "live")]
        with self._guard(session_id):
            pipe = self.connection.pipeline(transaction=False)
            APPEND.queue(pipe, names, args)
            pipe.zadd(key("index"), {session_id: updated}, xx=True, gt=True)
            res = pipe.execute()[0]
        what = text(res[0])
        if what == "nosession":
            raise NotFound("session", session_id, "create it first")
        if what == "version":
            raise SchemaVersionError(names[0], text(res[1]), SCHEMA)
        if what == "noparent":
            raise NotFound("message", text(res[1]), f"cannot attach to it in session {session_id!r}")
        out = []
        triples = zip(res[0::3], res[1::3], res[2::3], strict=True)
        for (m, _, _), (what, value, seq) in zip(drafts, triples, strict=True):
            if text(what) == "new":
                out.append(replace(m, parent_id=text(value) or None, seq=int(seq)))
                continue
            stored = decode_message(names[1], m.id, session_id, value)
            if stored.role != m.role or (m.status == "complete" and stored.content != m.content):
                raise Conflict(f"message id {m.id!r} already exists in session {session_id!r} with "
                               "different content; use a new id")
            out.append(self.get_message(session_id, m.id))
        return out

    def edit_message(self, session_id: str, message_id: str, content: str, *, new_message_id: str | None = None,
                     extra: Mapping[str, Any] | None = None) -> Message:
        """Add an edited copy of a message as its sibling (same parent, same role); it becomes the
        tip. The original and everything after it stay, as another branch."""
        old = self.get_message(session_id, message_id)
        return self.append_message(session_id, old.role, content, parent_id=old.parent_id,
                                   message_id=new_message_id, extra=old.extra if extra is None else extra)

    # ------------------------------------------------------------------ read

    def get_message(self, session_id: str, message_id: str) -> Message:
        msgs = key("msgs", session_id)
        with self._guard(session_id):
            pipe = self.connection.pipeline(transaction=False)
            pipe.hget(msgs, check_id(message_id))
            pipe.hget(key("live", session_id), message_id)
            raw, live = pipe.execute()
        if raw is None:
            raise NotFound("message", message_id, f"it is not in session {session_id!r}")
        m = decode_message(msgs, message_id, session_id, raw)
        return self._effective(m, None if live is None else text(live), time.time())

    def _effective(self, m: Message, live: str | None, now: float) -> Message:
        if m.status == "streaming" and not writer_alive(live, now, self.config.stale_after):
            return replace(m, status="incomplete")
        return m

    def load(self, session_id: str) -> Conversation:
        """The session and all its messages (every branch), in one consistent snapshot."""
        names = {k: key(k, session_id) for k in ("meta", "msgs", "live")}
        with self._guard(session_id):
            pipe = self.connection.pipeline(transaction=True)
            pipe.hgetall(names["meta"])
            pipe.hvals(names["msgs"])
            pipe.hgetall(names["live"])
            meta, values, live = pipe.execute()
        if not meta:
            raise NotFound("session", session_id, "see `chatcore sessions list`")
        session = decode_session(names["meta"], meta)
        with _no_gc():
            try:
                messages = decode_messages(names["msgs"], session_id, values)
            except CorruptRecord:  # name the field: read it again, this time with field names
                with self._guard(session_id):
                    pairs = self.connection.hgetall(names["msgs"])
                messages = [decode_message(names["msgs"], text(k), session_id, v) for k, v in pairs.items()]
            messages.sort(key=_by_seq)
            if live or any(m.status == "streaming" for m in messages):
                live_now, now = {text(k): text(v) for k, v in live.items()}, time.time()
                messages = [self._effective(m, live_now.get(m.id), now) if m.status == "streaming" else m
                            for m in messages]
            conv = Conversation(session, tuple(messages))
            by_id = conv.by_id
        if len(by_id) != len(messages):
            raise CorruptRecord(names["msgs"], "holds two records with the same message id")
        for m in messages:
            if m.parent_id is not None and m.parent_id not in by_id:
                raise CorruptRecord(names["msgs"], f"message {m.id!r} has a missing parent {m.parent_id!r}")
        if session.tip_id is not None and session.tip_id not in by_id:
            raise CorruptRecord(names["meta"], f"tip {session.tip_id!r} is not a message of the session")
        return conv

    def thread(self, session_id: str) -> list[Message]:
        """The current branch: messages from the root to the tip, in order."""
        return self.load(session_id).thread()

    # ------------------------------------------------------------------ branches

    def set_tip(self, session_id: str, message_id: str) -> None:
        """Make `message_id` the end of the current branch (exactly that message)."""
        with self._guard(session_id):
            res = SET_TIP(self.connection, [key("meta", session_id), key("msgs", session_id)],
                          [check_id(message_id), str(SCHEMA)])
        self._tip_result(session_id, message_id, text(res))

    def switch_branch(self, session_id: str, message_id: str) -> str:
        """Show the branch through `message_id`: the tip becomes its most recent descendant leaf."""
        conv = self.load(session_id)
        if message_id not in conv.by_id:
            raise NotFound("message", message_id, f"it is not in session {session_id!r}")
        leaf = conv.latest_leaf(message_id)
        assert leaf is not None
        self.set_tip(session_id, leaf)
        return leaf

    def _tip_result(self, session_id: str, message_id: str, res: str) -> None:
        if res == "nosession":
            raise NotFound("session", session_id)
        if res.startswith("version:"):
            raise SchemaVersionError(key("meta", session_id), res.partition(":")[2], SCHEMA)
        if res == "nomessage":
            raise NotFound("message", message_id, f"it is not in session {session_id!r}")

    def delete_message(self, session_id: str, message_id: str) -> list[str]:
        """Delete a message and everything that follows it on every branch; returns the ids removed.
        If the tip was among them, the tip moves to the newest leaf left under the parent."""
        names = {k: key(k, session_id) for k in ("meta", "msgs", "live")}
        check_id(message_id)

        def body(pipe: Any) -> list[str]:
            meta_raw = pipe.hgetall(names["meta"])
            if not meta_raw:
                raise NotFound("session", session_id)
            session = decode_session(names["meta"], meta_raw)
            pairs = pipe.hgetall(names["msgs"])
            messages = sorted((decode_message(names["msgs"], text(k), session_id, v) for k, v in pairs.items()),
                              key=_by_seq)
            parents = {m.id: m.parent_id for m in messages}
            if message_id not in parents:
                raise NotFound("message", message_id, f"it is not in session {session_id!r}")
            children = tree.children_index((m.id, m.parent_id) for m in messages)
            doomed = tree.subtree(children, message_id)
            gone = set(doomed)
            parent = parents[message_id]
            children[parent] = [c for c in children.get(parent, []) if c != message_id]
            tip = session.tip_id
            if tip is None or tip in gone:
                tip = tree.latest_leaf(children, parent)
            summary = session.summary
            if summary is not None and (summary.first_id in gone or summary.last_id in gone):
                summary = None
            fields = encode_session(replace(session, tip_id=tip, message_count=len(parents) - len(gone),
                                            pinned=tuple(p for p in session.pinned if p not in gone),
                                            summary=summary))
            pipe.multi()
            pipe.hdel(names["msgs"], *doomed)
            pipe.hdel(names["live"], *doomed)
            pipe.hset(names["meta"], mapping={f: fields[f] for f in ("tip", "count", "pinned", "summary")})
            return doomed
        return self._transact(session_id, body)

    # ------------------------------------------------------------------ token counts

    def set_token_counts(self, session_id: str, counts: Mapping[str, int]) -> int:
        """Record token counts (e.g. measured with the model's tokenizer). Unknown ids are ignored;
        returns how many were set. Only each record's header line is rewritten, and only if the
        record did not change meanwhile (a streaming reply's checkpoint wins; retry it later)."""
        for mid, n in counts.items():
            check_id(mid)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise InvalidInput(f"token count for {mid!r} must be a non-negative int, got {n!r}")
        ids = list(counts)
        if not ids:
            return 0
        msgs = key("msgs", session_id)
        with self._guard(session_id):
            raws = self.connection.hmget(msgs, ids)
        args: list[Any] = []
        for mid, raw in zip(ids, raws, strict=True):
            if raw is not None:
                m = decode_message(msgs, mid, session_id, raw)
                old = raw.partition(b"\n" if isinstance(raw, bytes) else "\n")[0]
                old = old.encode() if isinstance(old, str) else old
                args += [mid, hashlib.sha1(old).hexdigest(), message_header(replace(m, tokens=counts[mid]))]
        if not args:
            return 0
        with self._guard(session_id):
            return int(SET_HEADERS(self.connection, [msgs], args))


_by_seq = attrgetter("seq")


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic GC while building thousands of acyclic objects (it would rescan them all
    several times for nothing); restored afterwards unless someone else had it off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
