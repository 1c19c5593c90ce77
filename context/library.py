"""`SessionLibrary`: the stored sessions a front end lists, searches, shows and manages, with or without a
model. A live session (`ChatSession`) comes from it once the engine is ready.

    library = SessionLibrary.open()                 # storage.open_store(url): embedded Redis by default
    page = library.page(0, 200)                     # storage.SessionPage, most recent first
    library.messages(page.sessions[0].id)           # its current branch, as ChatMessages (no model needed)
    s = library.session(engine, page.sessions[0].id)

Everything it returns is plain data (storage's frozen records, context's `ChatMessage`); everything it raises
is a `storage.StorageError` (re-exported by `context.errors`) or a `context.ContextError`. storage (and so
redis) is imported when a library is opened, not when this module is, so a front end can import it while it
paints its first screen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .session import ChatMessage, ChatSession, branch_positions
from .slots import SlotPool


class SessionLibrary:
    def __init__(self, store: Any) -> None:
        """Wrap a `storage.Store` (its owner closes it, unless `close()` is called here)."""
        self._store = store

    @classmethod
    def open(cls, url: str | None = None) -> SessionLibrary:
        """Open storage at `url` (a Redis URL; None: $REDIS_URL, else the embedded Redis). Raises
        `StoreUnavailable` when it cannot be reached."""
        import storage

        return cls(storage.open_store(url))

    def close(self) -> None:
        self._store.close()

    # -- finding sessions -----------------------------------------------------------------------------
    def resolve(self, session_id: str) -> str:
        """The full id of the session `session_id` names (an id or a unique prefix); `NotFound` if none."""
        matches = self._store.match_session_ids(session_id)
        if len(matches) == 1:
            return str(matches[0])
        if self._store.session_exists(session_id):
            return session_id
        from storage import NotFound

        raise NotFound("session", session_id, "starting a new one")

    def page(self, offset: int = 0, limit: int = 200) -> Any:
        """A `storage.SessionPage` of sessions, most recently active first (`next_offset` None: the last)."""
        return self._store.list_sessions(offset, limit)

    def search(self, text: str, limit: int = 200) -> list[Any]:
        """Sessions whose title, tags or message text contain `text`, as `storage.SearchHit`s."""
        return list(self._store.search(text, limit=limit))

    def get(self, session_id: str) -> Any:
        """The session's `storage.Session` record (title, settings, pins), without its messages."""
        return self._store.get_session(session_id)

    def messages(self, session_id: str) -> list[ChatMessage]:
        """The session's current branch, root first, straight from storage. No turn has been planned, so
        every message counts as in context."""
        return self.view(session_id)[0]

    def branches(self, session_id: str) -> dict[str, tuple[int, int]]:
        """(position, count) of each message of the current branch that has alternatives, as
        `ChatSession.branches` gives them."""
        return self.view(session_id)[1]

    def view(self, session_id: str) -> tuple[list[ChatMessage], dict[str, tuple[int, int]]]:
        """`messages(id)` and `branches(id)` from one read of the session."""
        conv = self._store.load(session_id)
        thread = conv.thread()
        pinned = set(conv.session.pinned)
        shown = [ChatMessage(m.id, m.role, m.content, m.status, True, m.id in pinned, m.parent_id, m.created_at)
                 for m in thread]
        return shown, branch_positions(conv, thread)

    # -- managing sessions ----------------------------------------------------------------------------
    def rename(self, session_id: str, title: str) -> None:
        self._store.update_session(session_id, title=title)

    def delete(self, session_id: str) -> bool:
        """Delete the session and all its messages; False if there was none."""
        return bool(self._store.delete_session(session_id))

    # -- live sessions --------------------------------------------------------------------------------
    def session(self, engine: Any, session_id: str, *, window: int | None = None,
                pool: SlotPool | None = None) -> ChatSession:
        """`ChatSession.open` on this library's store."""
        return ChatSession.open(engine, self._store, session_id, window=window, pool=pool)

    def new_session(self, engine: Any, *, title: str = "", system: str | None = None, window: int | None = None,
                    pool: SlotPool | None = None, **sampling: Any) -> ChatSession:
        """`ChatSession.create` on this library's store."""
        return ChatSession.create(engine, self._store, title=title, system=system, window=window, pool=pool,
                                  **sampling)


def load_engine(model: str, progress: Callable[[int, int], None] | None = None, max_seq_len: int | None = None,
                status: Callable[[str], None] | None = None) -> Any:
    """The engine sessions run on: `chatcore.load(model)` ("demo", a directory or a .gguf file). torch is
    imported here, in the caller's thread, on the first call."""
    import chatcore

    return chatcore.load(model or "demo", progress=progress, max_seq_len=max_seq_len, status=status)
