"""Session records: create, read, settings, pins, summary, list by activity, delete."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from .base import StoreBase
from .codec import (
    SCHEMA,
    check_number,
    decode_session,
    dumps,
    encode_session,
    parse_session_hash,
    session_from_fields,
    text,
)
from .errors import Conflict, CorruptRecord, InvalidInput, MessageTooLarge, NotFound, SchemaVersionError, StorageError
from .keys import check_id, key, new_id, session_id_from_meta_key, session_keys, session_pattern
from .records import Session, SessionPage, Summary
from .scripts import CREATE, META


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: `update_session(field=UNSET)` leaves a field as it is (None is a value: it clears it).
UNSET: Any = _Unset()
_MAX_TITLE = 1024
_MAX_TAG = 64


def _valid(session_id: str) -> bool:
    try:
        check_id(session_id, "session")
    except InvalidInput:
        return False
    return True


class SessionsMixin(StoreBase):
    # ------------------------------------------------------------------ create / read

    def create_session(self, title: str = "", *, model: str | None = None, system_prompt: str | None = None,
                       sampling: Mapping[str, Any] | None = None, tags: Iterable[str] = (),
                       session_id: str | None = None) -> Session:
        """Create an empty session. `session_id` defaults to a fresh time-sortable id."""
        now = time.time()
        session = Session(id=check_id(session_id, "session") if session_id is not None else new_id(),
                          title=self._check_title(title), created_at=now, updated_at=now,
                          model=self._check_text_field(model, "model"),
                          system_prompt=self._check_prompt(system_prompt),
                          sampling=self._check_sampling(sampling), tags=self._check_tags(tags))
        self._write_new_session(session)
        return session

    def _write_new_session(self, session: Session) -> None:
        fields = encode_session(session)
        args = [fields["created"]] + [x for kv in fields.items() for x in kv]
        with self._guard(session.id):
            pipe = self.connection.pipeline(transaction=False)
            CREATE.queue(pipe, [key("meta", session.id)], args)
            pipe.zadd(key("index"), {session.id: session.updated_at}, nx=True)
            outcome = text(pipe.execute()[0])
        if outcome == "exists":
            raise Conflict(f"session {session.id!r} already exists; choose another id")

    def get_session(self, session_id: str) -> Session:
        """The session's record (settings, tip, counts), without messages."""
        got = self._fetch_sessions([check_id(session_id, "session")])[0]
        if got is None:
            raise NotFound("session", session_id, "see `chatcore sessions list`")
        if isinstance(got, StorageError):
            raise got
        return got

    def session_exists(self, session_id: str) -> bool:
        with self._guard(session_id):
            return bool(self.connection.exists(key("meta", session_id)))

    # ------------------------------------------------------------------ settings

    def update_session(self, session_id: str, *, title: Any = UNSET, model: Any = UNSET,
                       system_prompt: Any = UNSET, sampling: Any = UNSET, tags: Any = UNSET) -> Session:
        """Change any of title, model, system prompt, sampling parameters, tags (others untouched)."""
        changes: dict[str, Any] = {}
        if title is not UNSET:
            changes["title"] = self._check_title(title)
        if model is not UNSET:
            changes["model"] = self._check_text_field(model, "model")
        if system_prompt is not UNSET:
            changes["system_prompt"] = self._check_prompt(system_prompt)
        if sampling is not UNSET:
            changes["sampling"] = self._check_sampling(sampling)
        if tags is not UNSET:
            changes["tags"] = self._check_tags(tags)
        return self._mutate(session_id, lambda s, pipe: replace(s, **changes), touch=True)

    def pin(self, session_id: str, message_id: str) -> Session:
        """Pin a message (the context manager keeps pinned messages in context)."""
        def change(s: Session, pipe: Any) -> Session:
            self._require_message(pipe, session_id, message_id)
            return s if message_id in s.pinned else replace(s, pinned=s.pinned + (message_id,))
        return self._mutate(session_id, change)

    def unpin(self, session_id: str, message_id: str) -> Session:
        return self._mutate(session_id, lambda s, pipe: replace(
            s, pinned=tuple(p for p in s.pinned if p != message_id)))

    def set_summary(self, session_id: str, text: str, first_id: str, last_id: str, *,
                    tokens: int | None = None) -> Session:
        """Store the context summary covering the thread from `first_id` to `last_id` inclusive."""
        if not isinstance(text, str):
            raise InvalidInput("summary text must be a string")
        self._check_size(len(text.encode("utf-8")))
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
            raise InvalidInput(f"summary tokens must be a non-negative int, got {tokens!r}")
        summary = Summary(text, check_id(first_id), check_id(last_id), tokens, time.time())

        def change(s: Session, pipe: Any) -> Session:
            self._require_message(pipe, session_id, first_id)
            self._require_message(pipe, session_id, last_id)
            return replace(s, summary=summary)
        return self._mutate(session_id, change)

    def clear_summary(self, session_id: str) -> Session:
        return self._mutate(session_id, lambda s, pipe: replace(s, summary=None))

    def _require_message(self, pipe: Any, session_id: str, message_id: str) -> None:
        if not pipe.hexists(key("msgs", session_id), check_id(message_id)):
            raise NotFound("message", message_id, f"it is not in session {session_id!r}")

    def _mutate(self, session_id: str, change: Callable[[Session, Any], Session], *,
                touch: bool = False) -> Session:
        """Read-modify-write the session record under WATCH; only changed fields are written."""
        meta = key("meta", session_id)

        def body(pipe: Any) -> Session:
            raw = pipe.hgetall(meta)
            if not raw:
                raise NotFound("session", session_id)
            old = decode_session(meta, raw)
            new = change(old, pipe)
            if touch:
                new = replace(new, updated_at=max(time.time(), old.updated_at))
            before, after = encode_session(old), encode_session(new)
            diff = {f: v for f, v in after.items() if before[f] != v and f not in ("tip", "count")}
            pipe.multi()
            if diff:
                pipe.hset(meta, mapping=diff)
            if touch:
                pipe.zadd(key("index"), {session_id: new.updated_at}, xx=True, gt=True)
            return new
        return self._transact(session_id, body)

    # ------------------------------------------------------------------ list / delete

    def list_sessions(self, offset: int = 0, limit: int = 50) -> SessionPage:
        """A page of sessions, most recently active first. Unreadable ones land in `errors`."""
        if offset < 0 or limit < 1:
            raise InvalidInput("offset must be >= 0 and limit >= 1")
        index = key("index")
        with self._guard():
            pipe = self.connection.pipeline(transaction=False)
            pipe.zrevrange(index, offset, offset + limit - 1)
            pipe.zcard(index)
            ids, total = pipe.execute()
        ids = [text(i) for i in ids]
        sessions: list[Session] = []
        errors: list[Exception] = []
        for got in self._fetch_sessions(ids):
            if isinstance(got, Session):
                sessions.append(got)
            elif got is not None:
                errors.append(got)
        end = offset + len(ids)
        return SessionPage(tuple(sessions), tuple(errors), total, offset, end if end < total else None)

    def _fetch_sessions(self, ids: list[str]) -> list[Session | StorageError | None]:
        """Read many session records in one round trip. Per id: the Session, the error that makes
        it unreadable, or None if it no longer exists (deleted after the index was read)."""
        valid = [sid for sid in ids if _valid(sid)]
        with self._guard():
            pipe = self.connection.pipeline(transaction=False)
            for sid in valid:
                META.queue(pipe, [key("meta", sid)], [])
            replies = dict(zip(valid, pipe.execute(raise_on_error=False) if valid else [], strict=True))
        out: list[Session | StorageError | None] = []
        for sid in ids:
            if sid not in replies:
                out.append(CorruptRecord(key("index"), f"member {sid!r} is not a valid session id"))
                continue
            raw, meta = replies[sid], key("meta", sid)
            try:
                if raw is None:
                    out.append(None)
                elif isinstance(raw, Exception):
                    msg = self._scrub(str(raw))
                    out.append(CorruptRecord(meta, "is not a Redis hash (foreign data?)" if "WRONGTYPE" in msg
                                             else f"is unreadable ({msg[:80]})"))
                else:
                    try:
                        fields = json.loads(raw)
                    except ValueError:  # name the bad field
                        with self._guard(sid):
                            fields = parse_session_hash(meta, self.connection.hgetall(meta))
                    out.append(session_from_fields(meta, fields))
            except (CorruptRecord, SchemaVersionError) as exc:
                out.append(exc)
        return out

    def match_session_ids(self, prefix: str, limit: int = 10) -> list[str]:
        """Session ids starting with `prefix` (for typing a short id), at most `limit` of them."""
        check_id(prefix, "session")
        if self.session_exists(prefix):
            return [prefix]
        out: list[str] = []
        with self._guard():
            for member, _score in self.connection.zscan_iter(key("index"), match=prefix + "*", count=1000):
                out.append(text(member))
                if len(out) >= limit:
                    break
        return out

    def count_sessions(self) -> int:
        with self._guard():
            return int(self.connection.zcard(key("index")))

    def delete_session(self, session_id: str) -> bool:
        """Remove every key of the session (and its index entry). False if there was nothing."""
        names = session_keys(session_id)
        with self._guard(session_id):
            pipe = self.connection.pipeline(transaction=False)
            pipe.delete(*names)
            pipe.zrem(key("index"), session_id)
            deleted, unindexed = pipe.execute()
        return bool(deleted or unindexed)

    def reindex(self) -> int:
        """Rebuild the activity index from the session records (after a crash or a hand edit)."""
        index = key("index")
        found: dict[str, float] = {}
        with self._guard():
            for name in self.connection.scan_iter(match=session_pattern(), count=1000):
                sid = session_id_from_meta_key(text(name))
                if sid is None:
                    continue
                updated = self.connection.hget(name, "updated")
                try:
                    found[sid] = check_number(float(updated), "updated") if updated is not None else 0.0
                except (ValueError, InvalidInput):
                    found[sid] = 0.0
            stale = [text(m) for m in self.connection.zrange(index, 0, -1) if text(m) not in found]
            pipe = self.connection.pipeline(transaction=False)
            if stale:
                pipe.zrem(index, *stale)
            for i in range(0, len(found), 1000):
                pipe.zadd(index, dict(list(found.items())[i:i + 1000]))
            pipe.execute()
        return len(found)

    # ------------------------------------------------------------------ checks

    def _check_size(self, size: int) -> None:
        if size > self.config.max_message_bytes:
            raise MessageTooLarge(size, self.config.max_message_bytes)

    def _check_title(self, title: object) -> str:
        if not isinstance(title, str) or len(title) > _MAX_TITLE:
            raise InvalidInput(f"title must be a string of at most {_MAX_TITLE} characters")
        return title

    def _check_prompt(self, prompt: object) -> str | None:
        self._check_text_field(prompt, "system prompt")
        if prompt is not None:
            self._check_size(len(str(prompt).encode("utf-8")))
        return prompt  # type: ignore[return-value]

    @staticmethod
    def _check_text_field(value: object, what: str) -> str | None:
        if value is not None and not isinstance(value, str):
            raise InvalidInput(f"{what} must be a string or None, got {type(value).__name__}")
        return value

    @staticmethod
    def _check_sampling(sampling: Mapping[str, Any] | None) -> dict[str, Any]:
        if sampling is None:
            return {}
        if not isinstance(sampling, Mapping) or not all(isinstance(k, str) for k in sampling):
            raise InvalidInput("sampling parameters must be a mapping with string keys")
        out = dict(sampling)
        dumps(out)  # refuses anything that is not plain JSON data
        return out

    @staticmethod
    def _check_tags(tags: Iterable[str]) -> tuple[str, ...]:
        if isinstance(tags, str):
            raise InvalidInput("tags must be a list of strings, not one string")
        out: list[str] = []
        for t in tags:
            if not isinstance(t, str) or not t.strip() or len(t) > _MAX_TAG:
                raise InvalidInput(f"tag {t!r} must be a non-empty string of at most {_MAX_TAG} characters")
            if t not in out:
                out.append(t)
        return tuple(out)


__all__ = ["SCHEMA", "UNSET", "SessionsMixin"]
