"""open_store(): URLs, the embedded default (persistence, crash durability), a dead Redis, passwords."""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from pathlib import Path

import pytest
import redis
from _storage_helpers import RedisServer, free_port

from storage import InvalidInput, Outbox, StoreConfig, StoreUnavailable, open_store, redact_url
from storage.connect import data_dir, embedded_path, open_url

pytestmark = pytest.mark.redis

SECRET = "s3cr3t-P@ss:word/x"
QUOTED = "s3cr3t-P%40ss%3Aword%2Fx"


def leaked(exc: BaseException, *texts: str) -> bool:
    shown = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + repr(exc) + "".join(texts)
    return SECRET in shown or QUOTED in shown or "s3cr3t" in shown


def test_redact_url() -> None:
    assert redact_url("redis://:pw@host:6380/2") == "redis://:***@host:6380/2"
    assert redact_url("rediss://user:pw@h/0") == "rediss://user:***@h/0"
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert redact_url(f"redis://:{QUOTED}@[::1]:6379") == "redis://:***@[::1]:6379"
    assert "pw" not in redact_url("redis://:pw@host:notaport/0")


def test_dead_redis_fails_fast_and_clearly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"redis://:{QUOTED}@127.0.0.1:{free_port()}/0"
    t0 = time.time()
    with pytest.raises(StoreUnavailable) as info:
        open_store(url)
    assert time.time() - t0 < 5
    msg = str(info.value)
    assert "cannot reach Redis at redis://:***@127.0.0.1:" in msg and "\n" not in msg
    assert not leaked(info.value, caplog.text)
    store = open_store(url, check=False)  # opening lazily works; every call then fails cleanly
    assert not leaked(info.value, repr(store))
    with pytest.raises(StoreUnavailable) as info2:
        store.list_sessions()
    assert not leaked(info2.value, caplog.text)


def test_wrong_password_is_not_leaked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = RedisServer(tmp_path, "--requirepass", "the-real-one").start()
    try:
        with pytest.raises(StoreUnavailable, match="authentication failed; check the user") as info:
            open_store(f"redis://:{QUOTED}@127.0.0.1:{server.port}/0")
        assert not leaked(info.value, caplog.text)
        with pytest.raises(StoreUnavailable, match="requires a password; put it in the URL"):
            open_store(f"redis://127.0.0.1:{server.port}/0")  # no password at all
        ok = open_store(f"redis://:the-real-one@127.0.0.1:{server.port}/0")
        assert "the-real-one" not in repr(ok) and ok.create_session("x").title == "x"
        ok.close()
    finally:
        server.stop()


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidInput, match="unsupported Redis URL scheme 'http'"):
        open_store("http://:pw@host/0")
    with pytest.raises(InvalidInput, match="not a valid Redis URL") as info:
        open_store("redis://:pw@host:notaport/0")
    assert ":pw@" not in str(info.value)
    tls = open_url("rediss://:pw@127.0.0.1:1/0", check=False)
    assert tls.connection.connection_pool.connection_class.__name__ == "SSLConnection"

    server = RedisServer(tmp_path).start()
    try:
        monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{server.port}/3")
        store = open_store()  # REDIS_URL is honoured, db number included
        s = store.create_session("in db 3")
        raw = redis.Redis(port=server.port, db=3, decode_responses=True)
        assert raw.exists(f"chatcore:{{{s.id}}}:meta") == 1
        assert redis.Redis(port=server.port, db=0).dbsize() == 0
        explicit = open_store(f"redis://127.0.0.1:{server.port}/4")  # an explicit URL wins over REDIS_URL
        assert explicit.list_sessions().total == 0
        for c in (raw, store, explicit):
            c.close()
    finally:
        server.stop()


def test_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHATCORE_HOME", str(tmp_path / "home"))
    assert embedded_path() == tmp_path / "home" / "redis" / "sessions.rdb"
    monkeypatch.delenv("CHATCORE_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_dir() == tmp_path / "xdg" / "chatcore"


def test_embedded_default_persists_and_survives_a_server_crash(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("CHATCORE_HOME", str(tmp_path))
    store = open_store()
    assert str(tmp_path) in store.where
    s = store.create_session("kept")
    store.append_message(s.id, "user", "remember me")
    store.close()  # last user: the server saves and stops
    assert (tmp_path / "redis" / "sessions.rdb").exists() or (tmp_path / "redis" / "sessions.aof").exists()

    with open_store() as store:  # a new server loads the data; closing stops it again
        assert [m.content for m in store.thread(s.id)] == ["remember me"]
    store = open_store()
    store.append_message(s.id, "assistant", "written just before the crash")
    os.kill(store.connection.pid, signal.SIGKILL)  # the Redis server itself dies, no chance to save
    time.sleep(0.2)
    with pytest.raises(StoreUnavailable):
        store.get_session(s.id)
    store.close()
    store = open_store()
    assert [m.content for m in store.thread(s.id)] == ["remember me", "written just before the crash"]
    store.close()


def test_outbox_keeps_the_turn_while_redis_is_down(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    store = open_store(server.url)
    s = store.create_session()
    store.append_message(s.id, "user", "before the outage")
    first = store.append_message(s.id, "assistant", "answered")
    server.stop()

    outbox = Outbox(store)
    u = outbox.append_message(s.id, "user", "typed during the outage", parent_id=first.id)
    assert outbox.pending == 1 and isinstance(outbox.last_error, StoreUnavailable)
    assert (u.content, u.parent_id) == ("typed during the outage", first.id)
    w = store.begin_reply(s.id, parent_id=u.id)  # never raises for a dead Redis
    assert w.error is not None
    assert w.write("still ") and w.write("generating")
    with pytest.raises(StoreUnavailable):
        w.finish()
    assert outbox.submit(w.finish, "finish reply") is False and outbox.pending == 2
    assert outbox.flush() == 2

    server.start()  # Redis is back (same port, same data)
    assert outbox.flush() == 0 and outbox.last_error is None
    assert outbox.flush() == 0
    thread = store.thread(s.id)
    assert [(m.content, m.status) for m in thread] == [
        ("before the outage", "complete"), ("answered", "complete"), ("typed during the outage", "complete"),
        ("still generating", "complete")]
    assert thread[2].id == u.id and thread[2].created_at == u.created_at
    assert w.finish().status == "complete"  # finishing again is harmless
    assert len(store.load(s.id).messages) == 4  # replays did not duplicate anything
    store.close()
    server.stop()


def test_writer_backs_off_while_redis_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(f"redis://127.0.0.1:{free_port()}/0", check=False, config=StoreConfig(checkpoint_tokens=1))
    w = store.begin_reply("some-session")  # never raises for a dead Redis
    assert isinstance(w.error, StoreUnavailable)
    connects = 0
    connect = redis.connection.AbstractConnection.connect

    def counted(self: redis.connection.AbstractConnection) -> None:
        nonlocal connects
        connects += 1
        connect(self)

    monkeypatch.setattr(redis.connection.AbstractConnection, "connect", counted)
    for i in range(300):  # a checkpoint is due at every token, but attempts back off (counted, not timed)
        assert w.write(f"{i} ") is True
    assert connects < 30, f"{connects} connection attempts for 300 due checkpoints"
    assert w.text == "".join(f"{i} " for i in range(300))  # nothing lost in memory
    with pytest.raises(StoreUnavailable):
        w.finish()
