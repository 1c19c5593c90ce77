"""Terminal UI start-up with a large store: first paint, opening a 5,000-message session, model ready.

Usage: python bench/tui.py [--repeat 5] [--out bench/tui.json] [--plot bench/tui.png]

Fills a fresh embedded Redis (in a temporary CHATCORE_HOME) with 1,000 sessions, one of them 5,000
messages long. Then, `--repeat` times, each in a fresh Python process (so torch is imported every time,
as when a user starts `chatcore chat`), starts the real app headless (Textual's run_test, 120x40) on that
long session with the demo model and reads the app's own start-up timeline (`ChatApp.timeline`: seconds
from the app object's creation to each event, taken once the screen has refreshed after it):
- first paint (target: under 1 s);
- the long session on screen from storage, counted from the moment the store is open (target: opening
  the long session under 300 ms);
- the sidebar filled, the model loaded, and the live session (ChatSession.open over the 5,000 messages)
  shown.
The harness waits with plain `asyncio.sleep` polling: Textual's `pilot.pause` visits every widget on
screen each call, and polling with it every few milliseconds slowed the app it measured (the model load
looked ten times slower than it is).

Peers measured in the same run: loading the demo model outside the app (a fresh process, same call),
loading the 5,000 messages with `store.load`, and the sidebar filter's storage query (title and message
text) over the 1,000 sessions. Every figure is reported as the median and the minimum of the repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This folder holds bench/storage.py, which would shadow the storage package: look from the repo root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

TARGETS = {"first_paint_s": 1.0, "open_long_session_s": 0.3}
APP_KEYS = ("first_paint_s", "store_ready_s", "session_shown_s", "open_long_session_s", "sidebar_shown_s",
            "model_load_start_s", "model_ready_s", "app_model_load_s", "live_session_shown_s")


def fill(store: Any, n_sessions: int, long_len: int) -> str:
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


# -- children (fresh processes) -------------------------------------------------------------------------
async def _app_run(long_id: str, model: str) -> dict[str, float]:
    from tui.app import ChatApp

    t0 = time.perf_counter()
    app = ChatApp(model=model, session_id=long_id, timings=False)
    async with app.run_test(size=(120, 40)):
        outside_paint = time.perf_counter() - t0
        end = time.perf_counter() + 120
        while "live_session_shown" not in app.timeline and time.perf_counter() < end:
            await asyncio.sleep(0.02)  # not pilot.pause: see the module docstring
        tl = dict(app.timeline)
        rows = len(app.view.rows)
    out = {f"{k}_s": v for k, v in tl.items()}
    out["first_paint_s"] = max(outside_paint, tl.get("first_paint", 0.0))
    out["open_long_session_s"] = tl["session_shown"] - tl["store_ready"]
    out["app_model_load_s"] = tl["model_ready"] - tl["model_load_start"]
    out["rows"] = rows
    return out


def _child_load(model: str) -> dict[str, float]:
    t = time.perf_counter()
    import chatcore

    chatcore.load(model, progress=lambda done, total: None)
    return {"outside_model_load_s": time.perf_counter() - t}


def _child(argv: list[str]) -> None:
    what, model = argv[0], argv[1]
    result = asyncio.run(_app_run(argv[2], model)) if what == "app" else _child_load(model)
    print(json.dumps(result))


def _spawn(*args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- aggregation --------------------------------------------------------------------------------------
def summarize(runs: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    return {k: {"median": round(statistics.median(r[k] for r in runs), 4), "min": round(min(r[k] for r in runs), 4)}
            for k in keys if all(k in r for r in runs)}


def timed(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median": round(statistics.median(times), 4), "min": round(min(times), 4)}


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"first_paint_s": "first paint", "open_long_session_s": "open 5,000-msg session\n(after store open)",
              "sidebar_shown_s": "sidebar shown", "app_model_load_s": "model load, in the app",
              "outside_model_load_s": "model load, outside", "model_ready_s": "model ready",
              "live_session_shown_s": "live session shown"}
    stats = result["stats"]
    keys = [k for k in labels if k in stats]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    y = range(len(keys))
    ax.barh(y, [stats[k]["median"] for k in keys], color="#4c78a8", label="median")
    ax.scatter([stats[k]["min"] for k in keys], y, color="black", marker="|", s=200, zorder=3, label="min")
    for i, k in enumerate(keys):
        if k in TARGETS:
            ax.plot([TARGETS[k]] * 2, [i - 0.4, i + 0.4], color="#e45756", lw=2,
                    label="target" if k == "first_paint_s" else None)
    ax.set_yticks(list(y), [labels[k] for k in keys])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("seconds (log scale)")
    ax.set_title(f"chatcore chat start-up: {result['sessions']:,} sessions, "
                 f"{result['long_session_messages']:,}-message session ({result['repeat']} runs)", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "tui.json"))
    ap.add_argument("--plot", default=str(HERE / "tui.png"))
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from chatcore.demo import ensure_demo_model

    model = str(ensure_demo_model())
    home = tempfile.mkdtemp(prefix="chatcore-bench-tui-")
    os.environ["CHATCORE_HOME"] = home
    os.environ.pop("REDIS_URL", None)
    try:
        import storage

        store = storage.open_store()  # the children share this embedded server
        t = time.perf_counter()
        long_id = fill(store, args.sessions, args.messages)
        fill_s = time.perf_counter() - t
        loaded = len(store.load(long_id).messages)
        peers = {"store_load_long_session_s": timed(lambda: store.load(long_id), args.repeat),
                 "filter_query_miss_s": timed(lambda: store.search("no such text", limit=100), args.repeat),
                 "filter_query_hit_s": timed(lambda: store.search("answer 99", limit=100), args.repeat)}
        app_runs, load_runs = [], []
        for _ in range(args.repeat):  # interleaved, so a busy moment on the machine hits both alike
            app_runs.append(_spawn("app", model, long_id))
            load_runs.append(_spawn("load", model))
        store.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    stats = {**summarize(app_runs, APP_KEYS), **summarize(load_runs, ("outside_model_load_s",)), **peers}
    result = {"sessions": args.sessions, "long_session_messages": loaded, "rows": app_runs[0]["rows"],
              "repeat": args.repeat, "fill_s": round(fill_s, 2), "targets": TARGETS,
              "note": "median and min over fresh processes; 2 shared CPU cores, so single runs are noisy",
              "stats": stats, "runs": {"app": app_runs, "outside_load": load_runs}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    print(f"{'':>28} {'median':>8} {'min':>8}")
    for key, v in stats.items():
        print(f"{key:>28} {v['median']:8.3f} {v['min']:8.3f}")


if __name__ == "__main__":
    main()
