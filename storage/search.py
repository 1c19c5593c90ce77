"""Title / tag / content search: a scan over sessions, most recently active first.

Redis has no full-text index without modules, so this reads sessions in batches and stops once it
has `limit` hits. A cheap test on the raw JSON (the query escaped the same way) skips messages that
cannot match before anything is decoded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .codec import decode_message, decode_session, dumps, text
from .errors import CorruptRecord, InvalidInput, SchemaVersionError
from .keys import key
from .models import SearchHit, Session
from .sessions import _valid

if TYPE_CHECKING:
    from .base import StoreBase


def _snippet(content: str, at: int, width: int = 80) -> str:
    start = max(0, at - width // 3)
    piece = " ".join(content[start:start + width].split())
    return ("…" if start > 0 else "") + piece + ("…" if start + width < len(content) else "")


def search(store: StoreBase, query: str, *, limit: int = 20, content: bool = True,
           batch: int = 100) -> list[SearchHit]:
    """Sessions whose title or tags contain `query` (case-insensitive), or, with `content`, one of
    whose messages does; at most one hit per session, most recently active sessions first."""
    q = query.casefold().strip() if isinstance(query, str) else ""
    if not q:
        raise InvalidInput("search needs a non-empty query string")
    needle = dumps(q)[1:-1]  # how the query looks inside a stored JSON record
    hits: list[SearchHit] = []
    offset = 0
    while len(hits) < limit:
        with store._guard():
            found = [text(i) for i in store._r.zrevrange(key("index"), offset, offset + batch - 1)]
            if not found:
                break
            ids = [i for i in found if _valid(i)]
            pipe = store._r.pipeline(transaction=False)
            for sid in ids:
                pipe.hgetall(key("meta", sid))
                if content:
                    pipe.hgetall(key("msgs", sid))
            replies = pipe.execute(raise_on_error=False)
        offset += len(found)
        step = 2 if content else 1
        for i, sid in enumerate(ids):
            meta_raw = replies[i * step]
            if not meta_raw or isinstance(meta_raw, Exception):
                continue
            try:
                session = decode_session(key("meta", sid), meta_raw)
            except (CorruptRecord, SchemaVersionError):
                continue
            hit = _match_session(session, q)
            if hit is None and content and isinstance(replies[i * step + 1], dict):
                hit = _match_messages(session, replies[i * step + 1], q, needle)
            if hit is not None:
                hits.append(hit)
                if len(hits) >= limit:
                    break
    return hits


def _match_session(session: Session, q: str) -> SearchHit | None:
    at = session.title.casefold().find(q)
    if at >= 0:
        return SearchHit(session, None, _snippet(session.title, at))
    for tag in session.tags:
        if q in tag.casefold():
            return SearchHit(session, None, f"#{tag}")
    return None


def _match_messages(session: Session, msgs: dict, q: str, needle: str) -> SearchHit | None:
    best = None
    for field, raw in msgs.items():
        raw_text = text(raw)
        if needle not in raw_text.casefold():
            continue
        try:
            m = decode_message(key("msgs", session.id), text(field), session.id, raw_text)
        except (CorruptRecord, SchemaVersionError):
            continue
        at = m.content.casefold().find(q)
        if at >= 0 and (best is None or m.created_at > best[0].created_at):
            best = (m, at)
    if best is None:
        return None
    return SearchHit(session, best[0].id, _snippet(best[0].content, best[1]))
