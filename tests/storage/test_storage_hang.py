"""A hung Redis (SIGSTOP) or a TLS URL to a plain port: every storage call fails within a bound."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _storage_helpers import RedisServer

from storage import StoreConfig, StoreUnavailable
from storage.connect import embedded_path, open_embedded, open_url, registered_socket

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


HOLD = """
import sys
from storage import open_store
store = open_store()
store.ping()
print("ready", flush=True)
sys.stdin.readline()
store.close()
"""


def test_the_store_follows_an_embedded_server_restarted_elsewhere(tmp_path: Path) -> None:
    """The embedded server is killed mid-stream and another process starts a new one (new socket):
    this store's next calls reach it, and the reply streamed meanwhile is written whole."""
    home = tmp_path / "home"
    store = open_embedded(embedded_path(home), config=CONFIG)
    other = None
    try:
        s = store.create_session("restart")
        u = store.append_message(s.id, "user", "hi")
        a = store.append_message(s.id, "assistant", "hello", parent_id=u.id)
        u2 = store.append_message(s.id, "user", "more", parent_id=a.id)
        w = store.begin_reply(s.id, parent_id=u2.id)
        w.write("first ")
        w.checkpoint(force=True)
        time.sleep(1.5)  # the AOF is synced every second
        old_socket = store.connection.socket_file
        os.kill(store.connection.pid, signal.SIGKILL)
        time.sleep(0.2)
        for i in range(20):
            w.write(f"t{i} ")
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env.update(CHATCORE_HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        other = subprocess.Popen([sys.executable, "-c", HOLD], env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert other.stdout.readline().strip() == "ready", other.stderr.read()
        registry = embedded_path(home).with_name("sessions.rdb.settings")
        assert registered_socket(registry) != old_socket
        m = w.finish()
        assert m.content == "first " + "".join(f"t{i} " for i in range(20)) and m.parent_id == u2.id
        u3 = store.append_message(s.id, "user", "after the restart")
        assert u3.parent_id == m.id
        assert [x.content for x in store.thread(s.id)][-2:] == [m.content, "after the restart"]
        new_pid = int(Path(json.loads(registry.read_text())["pidfile"]).read_text())
        other.communicate("bye\n", timeout=30)  # it leaves the server running: this store still uses it
        assert store.get_session(s.id).tip_id == u3.id
        other = None
        store.close()  # the last user: the restarted server stops too
        with pytest.raises(ProcessLookupError):
            for _ in range(200):
                os.kill(new_pid, 0)
                time.sleep(0.05)
    finally:
        if other is not None:
            other.communicate("bye\n", timeout=30)
        store.close()
        _kill_registered(embedded_path(home).with_name("sessions.rdb.settings"))


def _kill_registered(registry: Path) -> None:
    """Leave no server behind when the test failed half way."""
    try:
        pid = int(Path(json.loads(registry.read_text())["pidfile"]).read_text())
    except (OSError, ValueError, KeyError):
        return
    with contextlib.suppress(OSError):
        if b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes():  # not a pid reused since
            os.kill(pid, signal.SIGKILL)


def test_a_callers_client_keeps_its_timeouts_and_an_unbounded_one_is_warned_about_once(
        server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """Store(client) never changes a client it does not own: an unbounded one (socket_timeout=None) gets one
    warning per client; one made with storage.client_options() keeps the documented bound on a hung Redis."""
    import redis

    from storage import Store, client_options

    unbounded = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=None)
    with caplog.at_level(logging.WARNING, logger="storage"):
        Store(unbounded)
        Store(unbounded)  # the same client again: no second warning
        Store(redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=3.0))  # bounded by its owner
    warned = [r.getMessage() for r in caplog.records if "handed to Store" in r.getMessage()]
    assert len(warned) == 1 and "socket_timeout" in warned[0] and "client_options" in warned[0]
    assert unbounded.connection_pool.connection_kwargs["socket_timeout"] is None  # left as the caller made it
    caplog.clear()
    bounded = redis.Redis(host="127.0.0.1", port=server.port, **client_options(CONFIG))
    with caplog.at_level(logging.WARNING, logger="storage"):
        store = Store(bounded, CONFIG)
    assert not [r for r in caplog.records if "handed to Store" in r.getMessage()]
    _stalled_calls(store, server.proc.pid)
    unbounded.close()
    bounded.close()
