"""Terminal UI start-up with a large store: first paint, opening a 5,000-message session, model ready.

Usage: python bench/tui.py [--out bench/tui.json]

Fills a fresh embedded Redis (in a temporary CHATCORE_HOME) with 1,000 sessions, one of them 5,000
messages long, then starts the real app headless (Textual's run_test, 120x40) on that long session with
the demo model, and records, from the moment the app object is created:
- first paint: the app mounted and its first frame composed (targets: under 1 s);
- stored session shown: the long session's messages on screen from storage, before the model is ready
  (target: opening the long session under 300 ms after the store is open);
- model ready, and the live session (ChatSession.open over the 5,000 messages) shown.
The peer measured in the same run is the store itself: loading the 5,000 messages with `store.load`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# This folder holds bench/storage.py, which would shadow the storage package: look from the repo root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def fill(store, n_sessions: int, long_len: int) -> str:  # noqa: ANN001
    from storage import NewMessage

    for i in range(n_sessions - 1):
        s = store.create_session(f"session {i}")
        store.append_many(s.id, [NewMessage("user", f"question {i}"), NewMessage("assistant", f"answer {i}")])
    long = store.create_session("the long one")
    for start in range(0, long_len, 500):
        store.append_many(long.id, [NewMessage("user" if k % 2 == 0 else "assistant",
                                               f"message {k}: " + "lorem ipsum dolor sit amet " * 4)
                                    for k in range(start, min(long_len, start + 500))])
    return long.id


async def measure(long_id: str, model: str) -> dict[str, float]:
    from tui.app import ChatApp

    marks: dict[str, float] = {}
    t0 = time.perf_counter()
    app = ChatApp(model=model, session_id=long_id, timings=False)
    async with app.run_test(size=(120, 40)) as pilot:
        marks["first_paint_s"] = time.perf_counter() - t0
        while app.store_state != "ready":
            await pilot.pause(0.005)
        marks["store_open_s"] = time.perf_counter() - t0
        while not app.view.rows:
            await pilot.pause(0.005)
        marks["stored_session_shown_s"] = time.perf_counter() - t0
        while app.load_state == "loading":
            await pilot.pause(0.01)
        marks["model_ready_s"] = time.perf_counter() - t0
        while app.session is None:
            await pilot.pause(0.01)
        marks["live_session_shown_s"] = time.perf_counter() - t0
        marks["rows"] = len(app.view.rows)
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("tui.json")))
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=5000)
    args = ap.parse_args()

    from chatcore.demo import ensure_demo_model

    model = str(ensure_demo_model())
    home = tempfile.mkdtemp(prefix="chatcore-bench-tui-")
    os.environ["CHATCORE_HOME"] = home
    os.environ.pop("REDIS_URL", None)
    try:
        import storage

        store = storage.open_store()
        t = time.perf_counter()
        long_id = fill(store, args.sessions, args.messages)
        fill_s = time.perf_counter() - t
        t = time.perf_counter()
        loaded = len(store.load(long_id).messages)
        load_s = time.perf_counter() - t
        marks = asyncio.run(measure(long_id, model))
        store.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    marks["open_long_session_s"] = marks["stored_session_shown_s"] - marks["store_open_s"]
    result = {"sessions": args.sessions, "long_session_messages": loaded, "fill_s": round(fill_s, 2),
              "store_load_long_session_s": round(load_s, 4),
              "targets": {"first_paint_s": 1.0, "open_long_session_s": 0.3},
              **{k: round(v, 4) for k, v in marks.items()}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for key in ("first_paint_s", "store_open_s", "stored_session_shown_s", "open_long_session_s",
                "model_ready_s", "live_session_shown_s", "store_load_long_session_s"):
        print(f"{key:>28} {result[key]:8.3f}")


if __name__ == "__main__":
    main()
