"""Turns kept in memory while Redis is unreachable reach storage in the background once it answers again,
with no further call on the session: a redis-server killed and restarted, one stopped (SIGSTOP) and
continued, and the embedded server stopped and continued. Plus the outbox's own rules, without Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _context_helpers import RedisProcess, drain

from context import ChatSession, Outbox, SaveEvent
from context.outbox import backoff
from storage import StorageError, StoreConfig, StoreUnavailable
from storage.connect import open_embedded, open_url

pytestmark = pytest.mark.redis

CONFIG = StoreConfig(timeout=0.5, keepalive=None)
SETTLE = 90.0  # generous: how long a poll waits for the background write (never asserted as a time)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisProcess]:
    s = RedisProcess(tmp_path / "redis").start()
    yield s
    s.kill()


def wait_until(cond: Callable[[], Any], what: str) -> Any:
    """Poll `cond` (storage errors count as not yet) until it is true; fail after SETTLE seconds."""
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        with contextlib.suppress(StorageError):
            found = cond()
            if found:
                return found
        time.sleep(0.1)
    raise AssertionError(f"not within {SETTLE:.0f}s: {what}")


def _pending_turn(s: ChatSession, events: list[SaveEvent]) -> tuple[list[Any], Any]:
    """Send a turn while Redis is unreachable: both messages are kept, pending, and reported so."""
    ev = drain(s.send("two"))
    shown = s.messages()
    assert [(m.role, m.pending) for m in shown] == [("user", False), ("assistant", False),
                                                     ("user", True), ("assistant", True)]
    assert ev.report.unsaved == 2 and s.unsaved == (shown[2].id, shown[3].id)
    assert events and events[-1].pending == s.unsaved and events[-1].error
    return shown, ev


def _written_in_background(store: Any, s: ChatSession, shown: list[Any], events: list[SaveEvent]) -> None:
    """With no call on the session, the pending turn lands whole, in order, and the session says so."""
    def four() -> list[Any] | None:
        thread = store.thread(s.id)
        return thread if len(thread) == 4 else None

    stored = wait_until(four, "the pending turn stored")
    assert [m.id for m in stored] == [m.id for m in shown]
    assert [m.content for m in stored] == [m.content for m in shown]
    assert stored[3].status == "complete" and stored[3].content and stored[3].parent_id == stored[2].id
    assert stored[2].parent_id == stored[1].id
    wait_until(lambda: not s.unsaved and events[-1].pending == (), "the session to report it saved")
    assert not any(m.pending for m in s.messages())
    assert {shown[2].id, shown[3].id} <= {mid for e in events for mid in e.saved}
    wait_until(lambda: not s._outbox.retrying, "the retry thread to end once nothing waits")


def test_a_turn_kept_while_redis_was_dead_is_written_once_it_restarts(chat_engine: Any, server: RedisProcess) -> None:
    store = open_url(server.url, config=CONFIG)
    s = ChatSession.create(chat_engine, store, max_new_tokens=6)
    events: list[SaveEvent] = []
    s.on_save(events.append)
    try:
        drain(s.send("one"))
        server.kill()
        shown, _ = _pending_turn(s, events)
        server.start()  # same port, same data: the first turn is there, the second is not yet
        _written_in_background(store, s, shown, events)
        drain(s.send("three"))  # the session goes on as usual, on the stored tip
        assert [m.content for m in store.thread(s.id)][4] == "three"
        assert store.thread(s.id)[4].parent_id == shown[3].id
    finally:
        s.close()
        store.close()


def test_a_turn_kept_while_redis_hung_is_written_once_it_continues(chat_engine: Any, server: RedisProcess) -> None:
    store = open_url(server.url, config=CONFIG)
    s = ChatSession.create(chat_engine, store, max_new_tokens=6)
    events: list[SaveEvent] = []
    s.on_save(events.append)
    try:
        drain(s.send("one"))
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            shown, _ = _pending_turn(s, events)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        _written_in_background(store, s, shown, events)
    finally:
        s.close()
        store.close()


def test_a_turn_kept_while_the_embedded_redis_hung_is_written_once_it_continues(chat_engine: Any,
                                                                               tmp_path: Path) -> None:
    store = open_embedded(tmp_path / "home" / "sessions.rdb", config=CONFIG)
    pid = store.connection.pid
    s = ChatSession.create(chat_engine, store, max_new_tokens=6)
    events: list[SaveEvent] = []
    s.on_save(events.append)
    try:
        drain(s.send("one"))
        os.kill(pid, signal.SIGSTOP)
        try:
            shown, _ = _pending_turn(s, events)
        finally:
            os.kill(pid, signal.SIGCONT)
        _written_in_background(store, s, shown, events)
    finally:
        s.close()
        store.close()


def test_close_stops_the_retry_and_returns_what_is_still_unsaved(chat_engine: Any, server: RedisProcess) -> None:
    store = open_url(server.url, config=CONFIG)
    s = ChatSession.create(chat_engine, store, max_new_tokens=4)
    try:
        drain(s.send("one"))
        server.kill()
        drain(s.send("two"))
        assert s._outbox.retrying
        lost = s.close()
        assert lost == s.unsaved and len(lost) == 2
        assert not s._outbox.retrying
        assert not [t for t in threading.enumerate() if t.name.startswith("chatcore-outbox") and t.is_alive()
                    and t.name.endswith(lost[0])]
    finally:
        store.close()


# -- the outbox alone (no Redis) ----------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff(i, 0.5, 10.0) for i in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff(10_000, 0.5, 10.0) == 10.0
    with pytest.raises(ValueError):
        Outbox(first_retry=2.0, max_retry=1.0)


def test_the_outbox_writes_in_order_drops_refused_writes_and_never_waits_for_another_flush() -> None:
    down = threading.Event()
    down.set()
    written: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def write(name: str) -> Callable[[], None]:
        def go() -> None:
            if down.is_set():
                raise StoreUnavailable("test redis", "it is down")
            if name == "gone":
                raise StorageError("the session was deleted")
            if name == "slow":
                entered.set()
                release.wait(30)
            written.append(name)
        return go

    box = Outbox("test redis", first_retry=60.0, max_retry=60.0)  # no background attempt during the test
    events: list[SaveEvent] = []
    box.subscribe(events.append)
    for name in ("a", "gone", "slow", "b"):
        box.add(name, write(name), StoreUnavailable("test redis", "it is down"))
    assert box.pending == ("a", "gone", "slow", "b") and events[-1].pending == box.pending
    with pytest.raises(StoreUnavailable):
        box.flush()
    assert box.pending == ("a", "gone", "slow", "b") and "it is down" in (box.error or "")
    down.clear()
    t = threading.Thread(target=box.flush)
    t.start()
    assert entered.wait(30)
    with pytest.raises(StoreUnavailable, match="being written"):
        box.flush(wait=False)  # another thread is flushing: give up at once (the token stream's way)
    release.set()
    t.join(30)
    assert written == ["a", "slow", "b"] and box.pending == () and box.error is None
    assert events[-1] == SaveEvent(saved=("a", "slow", "b"), dropped=("gone",), pending=(), error=None)
    assert box.close() == ()
