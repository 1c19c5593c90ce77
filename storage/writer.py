"""Streaming replies: saved while they stream, so a crash leaves a readable, incomplete reply."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .base import live_value
from .codec import decode_message, encode_message
from .errors import InvalidInput, NotFound, StorageError, StoreUnavailable
from .keys import key
from .records import FINAL_STATUSES, Message
from .scripts import CHECKPOINT, FINISH, HEARTBEAT

if TYPE_CHECKING:
    from .messages import MessagesMixin

log = logging.getLogger("storage")


class ReplyWriter:
    """Writes one streaming reply. Use as a context manager around generation:

        with store.begin_reply(sid, parent_id=user_msg.id) as w:
            for piece in engine.stream(...):
                if not w.write(piece):      # False: the reply was deleted elsewhere; stop
                    break
        # normal exit -> complete; an exception -> incomplete; KeyboardInterrupt -> cancelled

    The text is checkpointed at least every `checkpoint_tokens` tokens or `checkpoint_interval`
    seconds. While Redis is unreachable the text is kept in memory, `error` is set, and checkpoints
    retry with back-off; `finish()` raises StoreUnavailable and may simply be called again later
    (or handed to an `Outbox`).
    """

    def __init__(self, store: MessagesMixin, session_id: str, parent: Any, message_id: str, *,
                 role: str = "assistant", extra: Mapping[str, Any] | None = None,
                 before: Callable[[], Any] | None = None) -> None:
        self.store = store
        self.before = before  # a write that must land first (e.g. the user message it answers)
        self.session_id = session_id
        self.id = message_id
        self.role = role
        self.extra = dict(extra or {})
        self.parent_id: str | None = None if not isinstance(parent, str) else parent
        self._parent_ref = parent
        self.created_at = time.time()
        self._parts: list[str] = []
        self._bytes = 0
        self._pending = 0
        self._last_save = time.monotonic()
        self._started = False
        self._failures = 0
        self._retry_at = 0.0
        self.seq = -1
        self.error: StoreUnavailable | None = None  # the last failure to save, None once saved again
        self.gone = False  # the reply (or its session) was deleted by someone else
        self.finished: Message | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ streaming

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def write(self, delta: str, tokens: int = 1) -> bool:
        """Add generated text (`tokens` tokens of it). Returns False once the reply was deleted."""
        if self.finished is not None:
            raise InvalidInput(f"reply {self.id!r} is already finished; begin a new one")
        if self.gone:
            return False
        size = len(delta.encode("utf-8"))
        self.store._check_size(self._bytes + size)
        self._parts.append(delta)
        self._bytes += size
        self._pending += tokens
        if (self._pending >= self.store.config.checkpoint_tokens
                or time.monotonic() - self._last_save >= self.store.config.checkpoint_interval):
            self.checkpoint()
        return not self.gone

    def start(self) -> bool:
        """Store the (empty) reply as `streaming` now. Returns False if Redis is unreachable (the
        writer keeps going in memory and retries); raises NotFound for a missing session/parent."""
        return self.checkpoint(force=True)

    def checkpoint(self, *, force: bool = False) -> bool:
        """Save the text so far. Returns False if it could not be saved (see `error`, `gone`).

        While Redis is unreachable, attempts back off (1 s, 2 s, 4 s, ... up to 30 s) so that a
        dead network never stalls generation at every checkpoint; `force` tries regardless."""
        now = time.monotonic()
        self._last_save = now
        self._pending = 0
        if self.error is not None and not force and now < self._retry_at:
            return False
        try:
            if not self._started:
                self._begin()
            else:
                with self.store._guard(self.session_id):
                    ok = CHECKPOINT(self.store.connection, [key("msgs", self.session_id), key("live", self.session_id)],
                                    [self.id, encode_message(self._message("streaming")), live_value()])
                self.gone = not ok
        except StoreUnavailable as exc:
            if self.error is None:
                log.warning("reply %s not saved, kept in memory and retried: %s", self.id, exc)
            self.error = exc
            self._failures += 1
            self._retry_at = time.monotonic() + min(30.0, 2.0 ** (self._failures - 1))
            return False
        self.error = None
        self._failures = 0
        return not self.gone

    def heartbeat(self) -> None:
        """Tell readers this reply is still being generated (e.g. during a long prefill)."""
        if self._started and self.finished is None and not self.gone:
            with self.store._guard(self.session_id):
                alive = HEARTBEAT(self.store.connection, [key("live", self.session_id)], [self.id, live_value()])
            self.gone = not alive

    # ------------------------------------------------------------------ the end

    def finish(self, status: str = "complete", tokens: int | None = None) -> Message:
        """Save the final text with `status` (complete / cancelled / incomplete). Idempotent.
        Raises StoreUnavailable (state kept: call again) or NotFound (deleted while streaming)."""
        if self.finished is not None:
            return self.finished
        if status not in FINAL_STATUSES:
            raise InvalidInput(f"a reply finishes as one of {', '.join(FINAL_STATUSES)}, not {status!r}")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
            raise InvalidInput(f"tokens must be a non-negative int or None, got {tokens!r}")
        if not self._started:
            self._begin()  # safe to repeat: appends are idempotent by id
        if self.gone:
            raise NotFound("message", self.id, "the reply was deleted while it streamed")
        m = self._message(status, tokens)
        names = [key(k, self.session_id) for k in ("meta", "msgs", "live")]
        with self.store._guard(self.session_id):
            pipe = self.store.connection.pipeline(transaction=False)
            FINISH.queue(pipe, names, [self.id, encode_message(m), repr(m.updated_at)])
            pipe.zadd(key("index"), {self.session_id: m.updated_at}, xx=True, gt=True)
            res = pipe.execute()[0]
        if res[0] == 1:
            return self._done(m)
        if len(res) < 2 or res[1] is None:
            self.gone = True
            raise NotFound("message", self.id, "the reply was deleted while it streamed")
        # Finished before (our own earlier attempt whose answer was lost): report what is stored.
        return self._done(decode_message(names[1], self.id, self.session_id, res[1]))

    def cancel(self) -> Message:
        return self.finish("cancelled")

    def fail(self) -> Message:
        return self.finish("incomplete")

    def __enter__(self) -> ReplyWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self.finished is not None or self.gone:
            self._stop.set()
            return
        if exc_type is None:
            self.finish("complete")
            return
        status = "cancelled" if issubclass(exc_type, (KeyboardInterrupt, GeneratorExit)) else "incomplete"
        try:
            self.finish(status)
        except StorageError as err:  # never mask the exception that is already propagating
            log.warning("reply %s could not be marked %s: %s", self.id, status, err)

    # ------------------------------------------------------------------ internals

    def _message(self, status: str, tokens: int | None = None) -> Message:
        return Message(self.id, self.session_id, self.role, self.text, self.parent_id, status,  # type: ignore[arg-type]
                       self.created_at, time.time(), tokens, self.seq, self.extra)

    def draft(self, status: str = "streaming", tokens: int | None = None) -> Message:
        """The reply as it stands (or would be stored with `status`), saved or not."""
        return self._message(status, tokens)

    def _begin(self) -> None:
        if self.before is not None:
            before, self.before = self.before, None
            try:
                before()
            except BaseException:
                self.before = before  # StoreUnavailable while Redis is down: tried again next time
                raise
        m = self.store.append_message(self.session_id, self.role, self.text, parent_id=self._parent_ref,
                                      message_id=self.id, status="streaming", extra=self.extra)
        self.parent_id = m.parent_id
        self.seq = m.seq
        self._started = True
        if self.text:
            self.checkpoint(force=True)
        interval = self.store.config.keepalive
        if interval is not None:
            threading.Thread(target=_keepalive, args=(weakref.ref(self), self._stop, interval),
                             name=f"chatcore-keepalive-{self.id}", daemon=True).start()

    def _done(self, m: Message) -> Message:
        self._stop.set()
        self.finished = m
        self.parent_id = m.parent_id
        self.seq = m.seq
        return m


def _keepalive(ref: weakref.ref[ReplyWriter], stop: threading.Event, interval: float) -> None:
    """Heartbeat a reply until it finishes (or its writer is garbage collected)."""
    while not stop.wait(interval):
        writer = ref()
        if writer is None or writer.finished is not None or writer.gone:
            return
        try:
            writer.heartbeat()
        except StorageError as exc:
            log.debug("heartbeat of reply %s failed: %s", writer.id, exc)
        del writer
