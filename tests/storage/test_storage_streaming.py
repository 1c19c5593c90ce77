"""Streaming replies: checkpoint policy, final statuses, crash (kill -9) leaves an incomplete reply."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from storage import InvalidInput, NotFound, Store, StoreConfig, key

pytestmark = pytest.mark.redis


def stored(store: Store, sid: str, mid: str) -> tuple[str, str]:
    m = store.get_message(sid, mid)
    return m.status, m.content


def test_checkpoint_every_64_tokens(backend) -> None:
    store = backend.store(StoreConfig(checkpoint_interval=60.0))
    s = store.create_session()
    u = store.append_message(s.id, "user", "count")
    w = store.begin_reply(s.id, parent_id=u.id)
    assert stored(store, s.id, w.id) == ("streaming", "")  # saved before the first token
    for i in range(63):
        w.write(f"{i} ")
    assert stored(store, s.id, w.id) == ("streaming", "")
    w.write("63 ")
    assert stored(store, s.id, w.id) == ("streaming", "".join(f"{i} " for i in range(64)))
    w.write("tail", tokens=64)  # one chunk may carry many tokens
    assert stored(store, s.id, w.id)[1].endswith("tail")
    final = w.finish(tokens=65)
    assert (final.status, final.tokens) == ("complete", 65)
    got = store.get_message(s.id, w.id)
    assert (got.status, got.content, got.tokens, got.parent_id) == ("complete", final.content, 65, u.id)
    assert w.finish() is final  # idempotent
    with pytest.raises(InvalidInput, match="already finished"):
        w.write("more")


def test_checkpoint_at_least_every_interval(backend) -> None:
    store = backend.store(StoreConfig(checkpoint_interval=0.3))
    s = store.create_session()
    w = store.begin_reply(s.id)
    w.write("a")
    assert stored(store, s.id, w.id)[1] == ""
    time.sleep(0.35)
    w.write("b")
    assert stored(store, s.id, w.id)[1] == "ab"


def test_final_statuses_and_context_manager(store: Store) -> None:
    s = store.create_session()
    u = store.append_message(s.id, "user", "go")
    with store.begin_reply(s.id, parent_id=u.id) as w1:
        w1.write("done")
    assert store.get_message(s.id, w1.id).status == "complete"

    w2 = store.begin_reply(s.id, parent_id=u.id)
    w2.write("stop")
    assert w2.cancel().status == "cancelled"
    assert stored(store, s.id, w2.id) == ("cancelled", "stop")

    with pytest.raises(RuntimeError), store.begin_reply(s.id, parent_id=u.id) as w3:
        w3.write("partial")
        raise RuntimeError("model crashed")
    assert stored(store, s.id, w3.id) == ("incomplete", "partial")

    with pytest.raises(KeyboardInterrupt), store.begin_reply(s.id, parent_id=u.id) as w4:
        w4.write("ctrl-c")
        raise KeyboardInterrupt
    assert stored(store, s.id, w4.id) == ("cancelled", "ctrl-c")
    assert [m.parent_id for m in store.load(s.id).children(u.id)] == [u.id] * 4


def test_live_reply_reads_streaming_then_stale_reads_incomplete(backend) -> None:
    store = backend.store(StoreConfig(stale_after=0.5, keepalive=None))
    s = store.create_session()
    w = store.begin_reply(s.id)
    w.write("x")
    assert store.get_message(s.id, w.id).status == "streaming"
    time.sleep(0.6)  # no heartbeat for longer than stale_after
    assert store.get_message(s.id, w.id).status == "incomplete"
    assert store.load(s.id).messages[0].status == "incomplete"
    w.checkpoint()  # the writer was only slow: it comes back to life
    assert store.get_message(s.id, w.id).status == "streaming"


def test_keepalive_thread_keeps_a_slow_reply_streaming(backend) -> None:
    store = backend.store(StoreConfig(stale_after=0.4, keepalive=0.05))
    s = store.create_session()
    w = store.begin_reply(s.id)  # e.g. a long prefill: no tokens for a while
    time.sleep(0.6)
    assert store.get_message(s.id, w.id).status == "streaming"
    w.finish()
    assert store.get_message(s.id, w.id).status == "complete"


def test_dead_writer_on_this_host_reads_incomplete_at_once(store: Store, backend) -> None:
    s = store.create_session()
    w = store.begin_reply(s.id)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    here = socket.gethostname()
    backend.client.hset(key("live", s.id), w.id, f"{int(time.time() * 1000)} {dead_pid} {here}")
    assert store.get_message(s.id, w.id).status == "incomplete"
    backend.client.hset(key("live", s.id), w.id, f"{int(time.time() * 1000)} {dead_pid} other-host")
    assert store.get_message(s.id, w.id).status == "streaming"  # elsewhere: trust the fresh heartbeat
    backend.client.hset(key("live", s.id), w.id, f"{int(time.time() * 1000) - 600_000} 1 other-host")
    assert store.get_message(s.id, w.id).status == "incomplete"


def test_reply_deleted_while_streaming(store: Store) -> None:
    s = store.create_session()
    u = store.append_message(s.id, "user", "q")
    with store.begin_reply(s.id, parent_id=u.id) as w:
        w.write("a")
        store.delete_message(s.id, w.id)
        assert w.checkpoint() is False and w.gone
        assert w.write("b") is False  # the generation loop should stop
        with pytest.raises(NotFound, match="deleted while it streamed"):
            w.finish()
    assert [m.id for m in store.load(s.id).messages] == [u.id]  # nothing was resurrected


def test_begin_reply_needs_an_existing_parent(store: Store) -> None:
    s = store.create_session()
    with pytest.raises(NotFound):
        store.begin_reply(s.id, parent_id="nope")
    with pytest.raises(NotFound):
        store.begin_reply("no-session")


def test_kill_9_mid_stream_leaves_an_incomplete_reply(backend) -> None:
    store = backend.store()
    s = store.create_session("crash")
    u = store.append_message(s.id, "user", "tell me a long story")
    proc = backend.run("stream", s.id, u.id)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    thread = store.thread(s.id)
    assert [m.id for m in thread] == [u.id, "crash-reply"]
    assert thread[0].content == "tell me a long story" and thread[0].status == "complete"
    reply = thread[1]
    assert reply.status == "incomplete"
    words = reply.content.split()
    assert len(words) >= 40  # at least what was saved before "ready"
    assert words == [f"tok{i}" for i in range(len(words))]  # an exact prefix of what was generated
    proc.stdout.close()
    proc.stderr.close()
