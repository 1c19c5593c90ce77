"""Title / tag / content search: a scan over sessions, most recently active first.

Redis has no full-text index without modules, so this reads sessions in batches and stops once it
has `limit` hits. A record holds its text verbatim after the header line, so a cheap substring test
on the raw record skips messages that cannot match before anything is decoded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .codec import decode_message, text
from .errors import CorruptRecord, InvalidInput, SchemaVersionError
from .keys import key
from .records import SearchHit, Session

if TYPE_CHECKING:
    from .sessions import SessionsMixin


def _snippet(content: str, at: int, width: int = 80) -> str:
    start = max(0, at - width // 3)
    piece = " ".join(content[start:start + width].split())
    return ("…" if start > 0 else "") + piece + ("…" if start + width < len(content) else "")


def search(store: SessionsMixin, query: str, *, limit: int = 20, content: bool = True,
           batch: int = 100) -> list[SearchHit]:
    """Sessions whose title or tags contain `query` (case-insensitive), or, with `content`, one of
    whose messages does; at most one hit per session, most recently active sessions first."""
    q = query.casefold().strip() if isinstance(query, str) else ""
    if not q:
        raise InvalidInput("search needs a non-empty query string")
    hits: list[SearchHit] = []
    offset = 0
    while len(hits) < limit:
        with store._guard():
            found = [text(i) for i in store.connection.zrevrange(key("index"), offset, offset + batch - 1)]
        if not found:
            break
        offset += len(found)
        sessions = [s for s in store._fetch_sessions(found) if isinstance(s, Session)]
        found_hits, pending = [], []
        for session in sessions:
            hit = _match_session(session, q)
            if hit is not None:
                found_hits.append(hit)
            elif content:
                pending.append(session)
        if pending:
            with store._guard():
                pipe = store.connection.pipeline(transaction=False)
                for session in pending:
                    pipe.hgetall(key("msgs", session.id))
                replies = pipe.execute(raise_on_error=False)
            for session, msgs in zip(pending, replies, strict=True):
                hit = _match_messages(session, msgs, q) if isinstance(msgs, dict) else None
                if hit is not None:
                    found_hits.append(hit)
        rank = {s.id: i for i, s in enumerate(sessions)}  # most recently active first
        hits += sorted(found_hits, key=lambda h: rank[h.session.id])
    return hits[:limit]


def _match_session(session: Session, q: str) -> SearchHit | None:
    at = session.title.casefold().find(q)
    if at >= 0:
        return SearchHit(session, None, _snippet(session.title, at))
    for tag in session.tags:
        if q in tag.casefold():
            return SearchHit(session, None, f"#{tag}")
    return None


def _match_messages(session: Session, msgs: dict, q: str) -> SearchHit | None:
    best = None
    for field, raw in msgs.items():
        raw_text = text(raw)
        if q not in raw_text.casefold():  # cheap test on the whole record before decoding it
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
