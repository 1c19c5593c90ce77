"""Messages: idempotent appends, branches (edit / regenerate), the tip, loading, deletion."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import tree
from .base import live_value, writer_alive
from .codec import (
    RESERVED,
    SCHEMA,
    decode_message,
    decode_session,
    decode_tokens,
    dumps,
    encode_session,
    message_rest,
    text,
)
from .errors import Conflict, CorruptRecord, InvalidInput, NotFound, SchemaVersionError
from .keys import check_id, key, new_id
from .models import ROLES, STATUSES, Conversation, Message
from .scripts import APPEND, SET_TIP, SET_TOKENS
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
        created = now if item.created_at is None else float(item.created_at)
        msg = Message(mid, session_id, item.role, item.content, None, item.status, created, created,  # type: ignore[arg-type]
                      item.tokens, -1, extra)
        return msg, mode, parent

    def _append(self, session_id: str, items: Sequence[NewMessage]) -> list[Message]:
        now = time.time()
        drafts = [self._draft(session_id, it, now) for it in items]
        updated = max([now] + [m.created_at for m, _, _ in drafts])
        args: list[Any] = [str(SCHEMA), dumps(updated), len(drafts)]
        for m, mode, parent in drafts:
            args += [m.id, mode, parent, message_rest(m), live_value() if m.status == "streaming" else "",
                     "" if m.tokens is None else str(m.tokens)]
        names = [key(k, session_id) for k in ("meta", "msgs", "order", "live", "tok")]
        with self._guard(session_id):
            pipe = self._r.pipeline(transaction=False)
            APPEND.queue(pipe, names, args)
            pipe.zadd(key("index"), {session_id: updated}, xx=True, gt=True)
            res = [text(x) if isinstance(x, bytes) else x for x in pipe.execute()[0]]
        if res[0] == "nosession":
            raise NotFound("session", session_id, "create it first")
        if res[0] == "version":
            raise SchemaVersionError(names[0], res[1], SCHEMA)
        if res[0] == "noparent":
            raise NotFound("message", res[1], f"cannot attach to it in session {session_id!r}")
        out = []
        triples = zip(res[0::3], res[1::3], res[2::3], strict=True)
        for (m, _, _), (what, value, seq) in zip(drafts, triples, strict=True):
            if what == "new":
                out.append(replace(m, parent_id=json.loads(value), seq=int(seq)))
                continue
            stored = decode_message(names[1], m.id, session_id, value, int(seq))
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
            pipe = self._r.pipeline(transaction=False)
            pipe.hget(msgs, check_id(message_id))
            pipe.hget(key("tok", session_id), message_id)
            pipe.hget(key("live", session_id), message_id)
            pipe.lpos(key("order", session_id), message_id)
            raw, tok, live, seq = pipe.execute()
        if raw is None:
            raise NotFound("message", message_id, f"it is not in session {session_id!r}")
        tokens = None if tok is None else decode_tokens(key("tok", session_id), tok)
        m = decode_message(msgs, message_id, session_id, raw, -1 if seq is None else int(seq), tokens)
        return self._effective(m, None if live is None else text(live), time.time())

    def _effective(self, m: Message, live: str | None, now: float) -> Message:
        if m.status == "streaming" and not writer_alive(live, now, self.config.stale_after):
            return replace(m, status="incomplete")
        return m

    def load(self, session_id: str) -> Conversation:
        """The session and all its messages (every branch), in one consistent snapshot."""
        names = {k: key(k, session_id) for k in ("meta", "msgs", "order", "live", "tok")}
        with self._guard(session_id):
            pipe = self._r.pipeline(transaction=True)
            pipe.hgetall(names["meta"])
            pipe.hgetall(names["msgs"])
            pipe.lrange(names["order"], 0, -1)
            pipe.hgetall(names["live"])
            pipe.hgetall(names["tok"])
            meta, msgs, order, live, tok = pipe.execute()
        if not meta:
            raise NotFound("session", session_id, "see `chatcore sessions list`")
        session = decode_session(names["meta"], meta)
        msgs = {text(k): v for k, v in msgs.items()}
        tokens = {text(k): decode_tokens(names["tok"], v) for k, v in tok.items()}
        live = {text(k): text(v) for k, v in live.items()}
        now = time.time()
        messages: list[Message] = []
        for seq, raw_id in enumerate(order):
            mid = text(raw_id)
            raw = msgs.get(mid)
            if raw is None:
                raise CorruptRecord(names["order"], f"lists message {mid!r} that {names['msgs']} lacks")
            m = decode_message(names["msgs"], mid, session_id, raw, seq, tokens.get(mid))
            messages.append(self._effective(m, live.get(mid), now) if m.status == "streaming" else m)
        if len(messages) != len(msgs):
            stray = sorted(set(msgs) - {m.id for m in messages})[:3]
            raise CorruptRecord(names["msgs"], f"holds messages missing from the order list: {stray}")
        conv = Conversation(session, tuple(messages))
        for m in messages:
            if m.parent_id is not None and m.parent_id not in conv.by_id:
                raise CorruptRecord(names["msgs"], f"message {m.id!r} has a missing parent {m.parent_id!r}")
        if session.tip_id is not None and session.tip_id not in conv.by_id:
            raise CorruptRecord(names["meta"], f"tip {session.tip_id!r} is not a message of the session")
        return conv

    def thread(self, session_id: str) -> list[Message]:
        """The current branch: messages from the root to the tip, in order."""
        return self.load(session_id).thread()

    # ------------------------------------------------------------------ branches

    def set_tip(self, session_id: str, message_id: str) -> None:
        """Make `message_id` the end of the current branch (exactly that message)."""
        with self._guard(session_id):
            res = SET_TIP(self._r, [key("meta", session_id), key("msgs", session_id)],
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
        if res == "version":
            raise SchemaVersionError(key("meta", session_id), "other", SCHEMA)
        if res == "nomessage":
            raise NotFound("message", message_id, f"it is not in session {session_id!r}")

    def delete_message(self, session_id: str, message_id: str) -> list[str]:
        """Delete a message and everything that follows it on every branch; returns the ids removed.
        If the tip was among them, the tip moves to the newest leaf left under the parent."""
        names = {k: key(k, session_id) for k in ("meta", "msgs", "order", "live", "tok")}
        check_id(message_id)

        def body(pipe: Any) -> list[str]:
            meta_raw = pipe.hgetall(names["meta"])
            if not meta_raw:
                raise NotFound("session", session_id)
            session = decode_session(names["meta"], meta_raw)
            order = [text(i) for i in pipe.lrange(names["order"], 0, -1)]
            raws = pipe.hmget(names["msgs"], order) if order else []
            if message_id not in order:
                raise NotFound("message", message_id, f"it is not in session {session_id!r}")
            parents = {mid: decode_message(names["msgs"], mid, session_id, raw).parent_id
                       for mid, raw in zip(order, raws, strict=True) if raw is not None}
            children = tree.children_index((mid, parents.get(mid)) for mid in order)
            doomed = tree.subtree(children, message_id)
            gone = set(doomed)
            parent = parents.get(message_id)
            children[parent] = [c for c in children.get(parent, []) if c != message_id]
            tip = session.tip_id
            if tip is None or tip in gone:
                tip = tree.latest_leaf(children, parent)
            pinned = [p for p in session.pinned if p not in gone]
            summary = session.summary
            if summary is not None and (summary.first_id in gone or summary.last_id in gone):
                summary = None
            left = [mid for mid in order if mid not in gone]
            pipe.multi()
            for name in ("msgs", "live", "tok"):
                pipe.hdel(names[name], *doomed)
            if len(doomed) <= 16:
                for mid in doomed:
                    pipe.lrem(names["order"], 1, mid)
            else:
                pipe.delete(names["order"])
                for i in range(0, len(left), 1000):
                    pipe.rpush(names["order"], *left[i:i + 1000])
            fields = encode_session(replace(session, tip_id=tip, message_count=len(left),
                                            pinned=tuple(pinned), summary=summary))
            pipe.hset(names["meta"], mapping={f: fields[f] for f in ("tip", "count", "pinned", "summary")})
            return doomed
        return self._transact(session_id, body)

    # ------------------------------------------------------------------ token counts

    def set_token_counts(self, session_id: str, counts: Mapping[str, int]) -> int:
        """Record token counts (e.g. measured with the model's tokenizer). Unknown ids are ignored;
        returns how many were set."""
        args: list[Any] = []
        for mid, n in counts.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise InvalidInput(f"token count for {mid!r} must be a non-negative int, got {n!r}")
            args += [check_id(mid), str(n)]
        if not args:
            return 0
        with self._guard(session_id):
            return int(SET_TOKENS(self._r, [key("msgs", session_id), key("tok", session_id)], args))


def as_new_messages(messages: Iterable[Message]) -> list[NewMessage]:
    """Drafts that re-create `messages` exactly (ids, parents, statuses, times, tokens)."""
    return [NewMessage(m.role, m.content, m.parent_id, m.id, m.status, m.tokens, m.extra, m.created_at)
            for m in messages]
