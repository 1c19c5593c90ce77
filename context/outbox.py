"""`Outbox`: a session's writes that could not reach storage (Redis down or hung), kept in order and written
in the background once Redis answers again.

    box = Outbox(store.where)
    box.add(message_id, write)       # `write` failed with StoreUnavailable: keep it; a retry thread starts
    box.flush()                      # before the next storage call: write what waits, oldest first
    box.close()                      # stop retrying (one last attempt); returns the ids still unsaved

Each `write` must be idempotent (an append carrying its message id, a ReplyWriter's `finish`): a retry after
one that did land changes nothing. The retry thread waits `first_retry` seconds, then twice as long after each
failure, up to `max_retry`; each attempt is one flush, as long as the store's bounded timeouts let it take. It
ends when nothing waits, or on `close()`. It never holds up the token stream: a reply's writer asks with
`flush(wait=False)`, which gives up at once while another thread is writing.

No storage import at module level (context imports storage only where it uses it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("context")


@dataclass(frozen=True)
class SaveEvent:
    """What changed in a session's outbox. `saved`: message ids just written; `dropped`: ids storage refused
    for good (e.g. the session was deleted meanwhile; logged, not retried); `pending`: ids still waiting,
    oldest first (empty: everything is stored); `error`: the last failure, one line, while any wait."""

    saved: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()
    error: str | None = None


def backoff(attempt: int, first: float, cap: float) -> float:
    """Seconds before background attempt `attempt` (0-based): `first`, doubling, at most `cap`."""
    return min(cap, first * 2.0 ** min(attempt, 62))


class Outbox:
    """Writes waiting for Redis, oldest first, keyed by the message id they store."""

    def __init__(self, where: str = "storage", *, first_retry: float = 0.5, max_retry: float = 10.0) -> None:
        if not 0 < first_retry <= max_retry:
            raise ValueError("first_retry must be > 0 and at most max_retry")
        self.where = where
        self.first_retry, self.max_retry = first_retry, max_retry
        self._items: list[tuple[str, Callable[[], Any]]] = []
        self._ids: tuple[str, ...] = ()  # the items' ids, replaced (never changed) under the lock: read without it
        self._lock = threading.RLock()
        self._flushing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[SaveEvent], None]] = []
        self.error: str | None = None  # the last failure while something waits
        self.attempts = 0  # background attempts made (tests and benchmarks count them)

    # -- reading --------------------------------------------------------------------------------------
    @property
    def pending(self) -> tuple[str, ...]:
        """Ids of the messages waiting, oldest first. Never waits for a flush in progress (a UI may ask)."""
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def retrying(self) -> bool:
        """Whether the background retry thread is running."""
        t = self._thread
        return t is not None and t.is_alive()

    def subscribe(self, listener: Callable[[SaveEvent], None]) -> None:
        """Call `listener(event)` on every change, from the thread that made it (the caller's or the retry
        thread): keep it short and thread-safe (a Textual app: `post_message`)."""
        self._listeners.append(listener)

    # -- writing --------------------------------------------------------------------------------------
    def add(self, message_id: str, write: Callable[[], Any], error: BaseException | None = None) -> None:
        """Keep `write` (which just failed with StoreUnavailable `error`) until it lands; start the retry
        thread if it is not running. After `close()` it is kept but not retried (a later flush writes it)."""
        with self._lock:
            self._items.append((message_id, write))
            self._ids = (*self._ids, message_id)
            if error is not None:
                self.error = _one_line(error)
            event = SaveEvent(pending=self.pending, error=self.error)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=_retry, args=(weakref.ref(self), self._stop),
                                                name=f"chatcore-outbox-{message_id}", daemon=True)
                self._thread.start()
        log.warning("message %s kept in memory until %s answers (%d waiting)", message_id, self.where,
                    len(event.pending))
        self._tell(event)

    def flush(self, *, wait: bool = True) -> None:
        """Write what waits, oldest first. Raises StoreUnavailable (the rest kept) while Redis is still
        unreachable. `wait=False`: raise StoreUnavailable at once if another thread is flushing, rather than
        wait for it. A flush from inside a queued write (a reply's writer storing its user message first) is
        a no-op: the loop already wrote everything before it."""
        from storage.errors import StoreUnavailable

        if not self._lock.acquire(blocking=wait):
            raise StoreUnavailable(self.where, "earlier messages are being written now", "retried shortly")
        saved: list[str] = []
        dropped: list[str] = []
        try:
            if self._flushing or not self._items:
                return
            self._flushing = True
            try:
                self._write_all(saved, dropped)
            finally:
                self._flushing = False
        finally:
            event = SaveEvent(tuple(saved), tuple(dropped), self.pending, self.error) if saved or dropped else None
            self._lock.release()
            if event is not None:
                self._tell(event)

    def close(self, *, flush: bool = True) -> tuple[str, ...]:
        """Stop the retry thread; with `flush`, make one last attempt. Returns the ids still unsaved (lost
        when the process ends)."""
        from storage.errors import StoreUnavailable

        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=30)
        if flush:
            try:
                self.flush()
            except StoreUnavailable as exc:
                log.warning("%d message(s) could not be stored: %s", len(self), exc)
        return self.pending

    # -- internals ------------------------------------------------------------------------------------
    def _write_all(self, saved: list[str], dropped: list[str]) -> None:
        from storage.errors import StorageError, StoreUnavailable

        while self._items:
            mid, write = self._items[0]
            try:
                write()
            except StoreUnavailable as exc:
                self.error = _one_line(exc)
                raise
            except StorageError as exc:  # refused for good (the session was deleted meanwhile): do not block
                log.warning("message %s could not be stored and is dropped: %s", mid, exc)
                dropped.append(mid)
            else:
                saved.append(mid)
            self._items.pop(0)
            self._ids = self._ids[1:]
        self.error = None

    def _attempt(self) -> bool:
        """One background try; True when nothing waits any more (the thread then ends)."""
        from storage.errors import StoreUnavailable

        self.attempts += 1
        with contextlib.suppress(StoreUnavailable):
            self.flush(wait=False)
        with self._lock:
            if not self._items or self._stop.is_set():
                self._thread = None
                return True
        return False

    def _tell(self, event: SaveEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a listener's bug must not lose a write or kill the retry thread
                log.exception("a save listener failed")


def _retry(ref: weakref.ref[Outbox], stop: threading.Event) -> None:
    """The retry thread: back off, flush, until nothing waits, the outbox is closed or collected."""
    attempt = 0
    while True:
        box = ref()
        if box is None:
            return
        delay = backoff(attempt, box.first_retry, box.max_retry)
        del box
        if stop.wait(delay):
            break
        box = ref()
        if box is None or box._attempt():
            return
        del box
        attempt += 1
    box = ref()
    if box is not None:
        with box._lock:
            box._thread = None


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]
