"""Write-behind for when Redis is unreachable: keep the turn in memory, replay it in order later."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import InvalidInput, StorageError, StoreUnavailable
from .keys import check_id, new_id
from .messages import TIP, NewMessage
from .records import Message

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger("storage")


class Outbox:
    """Runs writes now, or queues them while Redis is down and replays them, in order, on `flush()`.

    Only idempotent writes belong here: appends carry their message id (so a replay after a write
    that did land does not duplicate it), and a `ReplyWriter.finish` may be repeated. Typical use:

        msg = outbox.append_message(sid, "user", text, parent_id=last_id)   # never raises for a dead Redis
        ...
        outbox.submit(writer.finish)            # after generation
        outbox.flush()                          # e.g. before each turn, or on a timer
    """

    def __init__(self, store: Store, *, limit: int = 10_000) -> None:
        self.store = store
        self.limit = limit
        self._queue: deque[tuple[str, Callable[[], Any]]] = deque()
        self.last_error: StoreUnavailable | None = None
        self.failed: list[tuple[str, StorageError]] = []  # writes dropped for a reason other than Redis down

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, fn: Callable[[], Any], description: str = "write") -> bool:
        """Run `fn` now (after anything still queued); queue it if Redis is unreachable.
        Returns True if it ran now."""
        if self._queue and self.flush():
            return self._enqueue(fn, description)
        try:
            fn()
        except StoreUnavailable as exc:
            self.last_error = exc
            return self._enqueue(fn, description)
        self.last_error = None
        return True

    def append_message(self, session_id: str, role: str, content: str, *, parent_id: str | None,
                       message_id: str | None = None, status: str = "complete", tokens: int | None = None,
                       extra: Mapping[str, Any] | None = None) -> Message:
        """Append (now or later). Returns the message as it is, or will be, stored. `parent_id` must
        be explicit (the tip may have moved by the time a queued write lands)."""
        if parent_id is TIP:
            raise InvalidInput("Outbox.append_message needs an explicit parent_id (a message id or None)")
        now = time.time()
        mid = check_id(message_id) if message_id is not None else new_id()
        item = NewMessage(role, content, parent_id, mid, status, tokens, dict(extra or {}), now)
        done: list[Message] = []
        if self.submit(lambda: done.extend(self.store.append_many(session_id, [item])), f"append {mid}"):
            return done[0]
        return Message(mid, session_id, role, content, parent_id, status, now, now, tokens, -1,  # type: ignore[arg-type]
                       dict(extra or {}))

    def flush(self) -> int:
        """Replay queued writes in order until one hits a dead Redis. Returns how many still wait."""
        while self._queue:
            description, fn = self._queue[0]
            try:
                fn()
            except StoreUnavailable as exc:
                self.last_error = exc
                return len(self._queue)
            except StorageError as exc:  # e.g. the session was deleted meanwhile: drop, do not block
                log.warning("storage: dropped queued %s: %s", description, exc)
                self.failed.append((description, exc))
            self._queue.popleft()
        self.last_error = None
        return 0

    def _enqueue(self, fn: Callable[[], Any], description: str) -> bool:
        if len(self._queue) >= self.limit:
            raise StorageError(f"{len(self._queue)} writes are waiting for Redis ({self.last_error}); "
                               "restore Redis before continuing")
        self._queue.append((description, fn))
        log.warning("storage: %s queued until Redis is back (%d waiting)", description, len(self._queue))
        return False
