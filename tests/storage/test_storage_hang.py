"""A hung Redis (SIGSTOP) or a TLS URL to a plain port: every storage call fails within a bound."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _storage_helpers import RedisServer

from storage import StoreConfig, StoreUnavailable
from storage.connect import open_embedded, open_url

pytestmark = pytest.mark.redis

CONFIG = StoreConfig(timeout=0.5, keepalive=None, checkpoint_tokens=4)
BOUND = CONFIG.bound + 0.5  # the documented bound, plus slack for a loaded machine


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path / "redis", port=6421).start()
    yield s
    if s.proc is not None:
        os.kill(s.proc.pid, signal.SIGCONT)
    s.stop()


def _timed(fn, *args, **kw) -> float:
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        fn(*args, **kw)
    return time.monotonic() - t0


def _stalled_calls(store, pid: int) -> None:
    s = store.create_session("hung")
    u = store.append_message(s.id, "user", "hi")
    w = store.begin_reply(s.id, parent_id=u.id)
    w.write("before ")
    os.kill(pid, signal.SIGSTOP)
    try:
        assert _timed(store.append_message, s.id, "user", "again") < BOUND
        t0 = time.monotonic()
        for i in range(40):  # the token stream goes on: at most one blocked checkpoint, then back-off
            w.write(f"t{i} ")
        assert time.monotonic() - t0 < BOUND
        assert w.error is not None
        assert _timed(w.finish) < BOUND
    finally:
        os.kill(pid, signal.SIGCONT)
    m = w.finish()  # Redis is back: the final write lands, whole
    assert m.content == "before " + "".join(f"t{i} " for i in range(40)) and m.status == "complete"
    assert store.get_message(s.id, w.id).content == m.content


def test_a_stopped_redis_server_fails_within_the_bound(server: RedisServer) -> None:
    store = open_url(server.url, config=CONFIG)
    _stalled_calls(store, server.proc.pid)
    store.close()


def test_a_stopped_embedded_redis_fails_within_the_bound(tmp_path: Path) -> None:
    store = open_embedded(tmp_path / "redis" / "sessions.rdb", config=CONFIG)
    try:
        _stalled_calls(store, store.connection.pid)
    finally:
        store.close()


def test_a_tls_url_to_a_plain_port_fails_within_the_bound(server: RedisServer) -> None:
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        open_url(f"rediss://127.0.0.1:{server.port}/0", config=CONFIG)
    assert time.monotonic() - t0 < BOUND
