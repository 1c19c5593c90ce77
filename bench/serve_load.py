"""A bounded load test of ``chatcore serve`` over loopback: many concurrent ``openai`` clients, each holding its own
multi-turn conversation, then a check through storage that every conversation was stored whole.

Usage: python bench/serve_load.py --out DIR [--model demo] [--device cpu|cuda] [--clients 64] [--turns 20]
    [--max-tokens 32] [--chat-share 0.25] [--redis-url URL] [--deadline SECONDS]
CPU run (here): python bench/serve_load.py --device cpu --out bench   (16 clients x 5 turns by default)

The server is a real process (``python -m chatcore serve --port 0``, the port read from its start-up line), with
its own embedded Redis in a fresh data directory (``CHATCORE_HOME``), or ``--redis-url``. Each client is its own
``AsyncOpenAI`` (no retries: every failure counts) and runs its turns one after another, all clients at once:
a ``--chat-share`` of them through ``/v1/chat/completions`` (the history kept client-side, resent each turn), the
others through ``/v1/responses`` with ``previous_response_id`` (the server keeps the history), all streaming.
Per request: time to the first text delta (TTFT) and to the end of the reply, from just before the request is
sent; errors (any exception, an error event, a reply with no text). Afterwards (p50 / p95 / p99 of both
latencies, overall and per turn) the server is stopped and the store opened from this process: for every
``/v1/responses`` client its session holds exactly its turns (its user message, then a complete, non-empty
assistant reply, each turn in order, the ids the response records name), and each of its response records is
there with status completed (or incomplete because of max_output_tokens). The results go to
DIR/serve_load.json (serve_load_cpu.json on the CPU) and a plot next to it; the test fails (exit status 1, the
server's log copied next to the JSON) when any request failed or any conversation is not complete.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# this folder goes after the packages (python puts it first): bench/storage.py must not hide `storage`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
from load_stats import check_serve_json, summary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ("rivers", "bread", "the moon", "trains", "owls", "chess", "tea", "glaciers", "violins", "bees",
          "lighthouses", "maps", "volcanoes", "paper", "clocks", "salt")


@dataclass
class Turn:
    client: int
    turn: int
    api: str
    start: float
    first: float | None = None
    end: float | None = None
    text: str = ""
    response_id: str | None = None
    status: str | None = None
    cached_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None


@dataclass
class Client:
    index: int
    api: str
    turns: list[Turn] = field(default_factory=list)


def user_message(client: int, turn: int) -> str:
    topic = TOPICS[(client + turn) % len(TOPICS)]
    return f"Tell me one short fact about {topic}." if turn == 0 else f"And one more about {topic}, please."


# -- the server ----------------------------------------------------------------------------------------------------
class Server:
    """``chatcore serve`` in a child process, on a free loopback port."""

    LISTENING = re.compile(r"on http://(\S+?):(\d+)/v1")

    def __init__(self, args: argparse.Namespace, home: Path, log_path: Path) -> None:
        model = args.model
        if model == "demo":   # the cached demo file: the server's fresh CHATCORE_HOME would fetch it again
            from chatcore.demo import ensure_demo_model

            model = str(ensure_demo_model())
        cmd = [sys.executable, "-m", "chatcore", "serve", "--model", model, "--port", "0", "--host", "127.0.0.1",
               "--served-model-name", Path(args.model).stem if args.model != "demo" else "demo"]
        if args.device:
            cmd += ["--device", args.device]
        if args.max_seq_len:
            cmd += ["--max-seq-len", str(args.max_seq_len)]
        if args.redis_url:
            cmd += ["--redis-url", args.redis_url]
        cmd += args.server_arg
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))   # and what it had
        env = {**os.environ, "CHATCORE_HOME": str(home), "PYTHONPATH": path}
        self.cmd = cmd
        self.log_path = log_path
        self.log = log_path.open("w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.PIPE, text=True)
        self.url = self._wait_for_start(args.start_timeout)
        self.start_s = time.perf_counter() - t0

    def _wait_for_start(self, timeout: float) -> str:
        found: list[str] = []
        ready = threading.Event()

        def pump() -> None:   # copy the server's stderr to the log, note the line that gives its address
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.write(line)
                self.log.flush()
                m = self.LISTENING.search(line)
                if m and not found:
                    found.append(f"http://{m.group(1)}:{m.group(2)}/v1")
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        ready.wait(timeout)
        if not found:
            self.stop()
            tail = self.log_path.read_text()[-2000:]
            raise SystemExit(f"chatcore serve did not start within {timeout:.0f} s:\n{tail}")
        return found[0]

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGINT (uvicorn's graceful shutdown), then SIGTERM, then SIGKILL; the exit status."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                continue
        self.log.flush()
        return self.proc.poll()


# -- the clients ---------------------------------------------------------------------------------------------------
async def responses_turn(api: Any, model: str, t: Turn, text: str, previous: str | None,
                         args: argparse.Namespace) -> None:
    kw: dict[str, Any] = {"previous_response_id": previous} if previous else {}
    stream = await api.responses.create(model=model, input=text, stream=True, max_output_tokens=args.max_tokens,
                                        temperature=args.temperature, truncation="auto", **kw)
    parts: list[str] = []
    async for ev in stream:
        kind = getattr(ev, "type", "")
        if kind == "response.output_text.delta":
            if t.first is None and ev.delta:
                t.first = time.perf_counter()
            parts.append(ev.delta)
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            resp = ev.response
            t.response_id, t.status = resp.id, resp.status
            usage = getattr(resp, "usage", None)
            if usage is not None:
                t.output_tokens = usage.output_tokens
                details = getattr(usage, "input_tokens_details", None)
                t.cached_tokens = getattr(details, "cached_tokens", None)
            if kind == "response.failed":
                t.error = f"response.failed: {getattr(resp, 'error', None)}"
        elif kind == "error":
            t.error = f"error event: {getattr(ev, 'code', None)} {getattr(ev, 'message', None)}"
    t.text = "".join(parts)


async def chat_turn(api: Any, model: str, t: Turn, history: list[dict[str, str]], args: argparse.Namespace) -> None:
    stream = await api.chat.completions.create(model=model, messages=history, stream=True, max_tokens=args.max_tokens,
                                               temperature=args.temperature,
                                               stream_options={"include_usage": True})
    parts: list[str] = []
    async for chunk in stream:
        for choice in chunk.choices or []:
            delta = choice.delta.content if choice.delta is not None else None
            if delta:
                if t.first is None:
                    t.first = time.perf_counter()
                parts.append(delta)
            if choice.finish_reason is not None:
                t.status = choice.finish_reason
        if getattr(chunk, "usage", None) is not None:
            t.output_tokens = chunk.usage.completion_tokens
            details = getattr(chunk.usage, "prompt_tokens_details", None)
            t.cached_tokens = getattr(details, "cached_tokens", None)
    t.text = "".join(parts)


async def run_client(url: str, model: str, c: Client, args: argparse.Namespace, gate: asyncio.Event,
                     stop_at: float) -> None:
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=url, api_key=args.api_key or "none", max_retries=0, timeout=args.request_timeout)
    await gate.wait()
    previous: str | None = None
    history: list[dict[str, str]] = []
    try:
        for k in range(args.turns):
            if time.perf_counter() > stop_at:
                break
            text = user_message(c.index, k)
            t = Turn(c.index, k, c.api, start=time.perf_counter())
            c.turns.append(t)
            try:
                if c.api == "responses":
                    await responses_turn(api, model, t, text, previous, args)
                    previous = t.response_id
                else:
                    history.append({"role": "user", "content": text})
                    await chat_turn(api, model, t, history, args)
                    history.append({"role": "assistant", "content": t.text})
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                t.error = f"{type(exc).__name__}: {str(exc)[:300]}"
            t.end = time.perf_counter()
            if t.error is None and not t.text:
                t.error = "a reply without text"
            if t.error is None and c.api == "responses" and t.response_id is None:
                t.error = "no response id at the end of the stream"
            if t.error is not None:
                break   # the conversation cannot go on from a failed turn
    finally:
        await api.close()


async def run_load(url: str, model: str, clients: list[Client], args: argparse.Namespace, stop_at: float,
                   start_at: float | None = None) -> tuple[float, float]:
    """Every client's turns, all at once: (start, end) in ``time.perf_counter`` seconds (system-wide monotonic on
    Linux, so processes compare). ``start_at``: the first request waits for that moment (a process of several)."""
    gate = asyncio.Event()
    tasks = [asyncio.create_task(run_client(url, model, c, args, gate, stop_at)) for c in clients]
    await asyncio.sleep(0.2)   # every client made before the first request
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    t0 = time.perf_counter()
    gate.set()
    await asyncio.gather(*tasks)
    return t0, time.perf_counter()


def cpu_seconds(pid: int | None = None) -> float | None:
    """CPU seconds (user + system) this process (None) or process ``pid`` has used (Linux /proc; else None)."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_process(url: str, model: str, clients: list[Client], args: argparse.Namespace, stop_at: float,
                   start_at: float | None = None) -> tuple[list[Client], float, float, float | None]:
    """The clients' turns from this process (one of ``--client-procs``, or the only one): the clients, the
    load's start and end (``time.perf_counter``), the process's CPU seconds over it."""
    before = cpu_seconds()
    t0, t1 = asyncio.run(run_load(url, model, clients, args, stop_at, start_at))
    after = cpu_seconds()
    return clients, t0, t1, None if before is None or after is None else after - before


def run_clients(url: str, model: str, clients: list[Client], args: argparse.Namespace,
                stop_at: float) -> tuple[list[Client], float, float | None]:
    """The load from this process (``--client-procs 1``) or spread over that many processes (each client in one,
    all starting together): (the clients with their turns, wall seconds, the clients' CPU seconds)."""
    procs = max(1, min(args.client_procs, len(clients)))
    if procs == 1:
        _, t0, t1, cpu_s = client_process(url, model, clients, args, stop_at)
        return clients, t1 - t0, cpu_s
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    shares = [clients[i::procs] for i in range(procs)]
    start_at = time.perf_counter() + 8.0   # time for every process to start and import the client
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = [f.result() for f in [pool.submit(client_process, url, model, share, args, stop_at, start_at)
                                     for share in shares]]
    back = sorted((c for d in done for c in d[0]), key=lambda c: c.index)
    cpu = [d[3] for d in done]
    return back, max(d[2] for d in done) - min(d[1] for d in done), None if None in cpu else sum(cpu)


# -- the check through storage -------------------------------------------------------------------------------------
def check_storage(clients: list[Client], args: argparse.Namespace, home: Path) -> dict[str, Any]:
    """Open the store the server used (it has stopped) and check every /v1/responses conversation."""
    os.environ["CHATCORE_HOME"] = str(home)
    import storage

    store = storage.open_store(args.redis_url)
    problems: list[str] = []
    complete = 0
    checked = [c for c in clients if c.api == "responses"]
    try:
        for c in checked:
            found = conversation_problems(store, c, args.turns)
            problems += found
            complete += not found
    finally:
        store.close()
    return {"conversations": len(checked), "conversations_complete": complete, "problems": problems[:20],
            "problem_count": len(problems)}


def conversation_problems(store: Any, c: Client, turns: int) -> list[str]:
    """What is wrong with client ``c``'s stored conversation (empty: it holds all ``turns`` turns, whole)."""
    from storage import StorageError

    who = f"client {c.index}"
    if len(c.turns) < turns or any(t.response_id is None for t in c.turns):
        return [f"{who}: {len(c.turns)} of {turns} turns answered"]
    try:
        recs = [store.get_response(t.response_id) for t in c.turns]
        sid = recs[0].session_id
        thread = store.thread(sid)
        stored = store.session_responses(sid)
    except StorageError as exc:
        return [f"{who}: {type(exc).__name__}: {exc}"]
    out: list[str] = []
    if {r.session_id for r in recs} != {sid}:
        out.append(f"{who}: its responses are in {len({r.session_id for r in recs})} sessions")
    if len(stored) != turns:
        out.append(f"{who}: {len(stored)} response records stored, {turns} expected")
    for k, r in enumerate(recs):
        if r.status not in ("completed", "incomplete") or (r.status == "incomplete"
                                                           and r.incomplete_reason != "max_output_tokens"):
            out.append(f"{who} turn {k}: response {r.status} ({r.incomplete_reason or r.error})")
        if k and r.previous_id != recs[k - 1].id:
            out.append(f"{who} turn {k}: previous_response_id {r.previous_id} is not turn {k - 1}'s")
    msgs = [m for m in thread if m.role != "system"]
    if len(msgs) != 2 * turns:
        out.append(f"{who}: the session's thread has {len(msgs)} messages, {2 * turns} expected")
    expected_ids = [i for r in recs for i in (*r.input_ids, r.output_id)]
    if [m.id for m in msgs] != expected_ids:
        out.append(f"{who}: the thread's messages are not the ones its responses name, in order")
    for k, m in enumerate(msgs):
        want = "user" if k % 2 == 0 else "assistant"
        if m.role != want:
            out.append(f"{who} message {k}: {m.role}, {want} expected")
        if m.role == "assistant" and (m.status != "complete" or not m.content):
            out.append(f"{who} message {k}: reply {m.status}, {len(m.content)} characters")
        if m.role == "user" and m.content != user_message(c.index, k // 2):
            out.append(f"{who} message {k}: the user text differs from what was sent")
    return out


# -- results -------------------------------------------------------------------------------------------------------
def tally(clients: list[Client], wall: float, args: argparse.Namespace) -> dict[str, Any]:
    turns = [t for c in clients for t in c.turns]
    ok = [t for t in turns if t.error is None and t.first is not None and t.end is not None]
    errors = [t for t in turns if t.error is not None]
    out_tokens = sum(t.output_tokens or 0 for t in ok)
    per_turn = {}
    for k in range(args.turns):
        at = [t for t in ok if t.turn == k]
        if at:
            per_turn[str(k)] = {"n": len(at), "ttft_p50": summary([t.first - t.start for t in at])["p50"],
                                "ttft_p95": summary([t.first - t.start for t in at])["p95"],
                                "reply_p50": summary([t.end - t.start for t in at])["p50"],
                                "reply_p95": summary([t.end - t.start for t in at])["p95"]}
    cached = [t.cached_tokens for t in ok if t.turn > 0 and t.api == "responses" and t.cached_tokens is not None]
    res: dict[str, Any] = {
        "clients": len(clients), "turns": args.turns,
        "apis": {api: sum(c.api == api for c in clients) for api in ("responses", "chat")},
        "requests": len(turns), "expected_requests": len(clients) * args.turns, "ok": len(ok),
        "errors": len(errors) + (len(clients) * args.turns - len(turns)),
        "error_samples": sorted({t.error for t in errors})[:10], "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / wall if wall > 0 else 0.0,
        "ttft_s": summary([t.first - t.start for t in ok]), "reply_s": summary([t.end - t.start for t in ok]),
        "per_turn": per_turn,
        "responses_cached_tokens_after_turn_0": summary(cached) if cached else None,
        "reply_status": {s: sum(t.status == s for t in ok) for s in sorted({str(t.status) for t in ok})},
    }
    for api in ("responses", "chat"):
        sub = [t for t in ok if t.api == api]
        if sub:
            res[f"{api}_ttft_s"] = summary([t.first - t.start for t in sub])
            res[f"{api}_reply_s"] = summary([t.end - t.start for t in sub])
    return res


def cpu_use(run: dict[str, Any], server_s: float | None, client_s: float | None, procs: int) -> dict[str, Any]:
    """CPU seconds the server process and the clients used during the load, and per output token (which side
    runs out of CPU first: one Python process holds one GIL)."""
    tokens = run.get("output_tokens") or 0

    def per_token(sec: float | None) -> float | None:
        return None if sec is None or not tokens else sec * 1e3 / tokens

    return {"client_procs": procs, "server_cpu_s": server_s, "client_cpu_s": client_s,
            "server_cpu_ms_per_output_token": per_token(server_s),
            "client_cpu_ms_per_output_token": per_token(client_s)}


def plot(run: dict[str, Any], clients: list[Client], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    ok = [t for c in clients for t in c.turns if t.error is None and t.first is not None and t.end is not None]
    for label, values in (("TTFT", [t.first - t.start for t in ok]), ("whole reply", [t.end - t.start for t in ok])):
        xs = sorted(values)
        left.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    left.set_xlabel("seconds")
    left.set_ylabel("fraction of requests")
    left.set_title(f"{run['clients']} clients x {run['turns']} turns, {run['errors']} errors")
    left.legend()
    turns = sorted(int(k) for k in run["per_turn"])
    for key, style in (("ttft_p50", "o-"), ("ttft_p95", "o--"), ("reply_p50", "s-"), ("reply_p95", "s--")):
        right.plot(turns, [run["per_turn"][str(k)][key] for k in turns], style, label=key.replace("_", " "))
    right.set_xticks(turns, [str(k + 1) for k in turns])
    right.set_xlabel("turn of the conversation")
    right.set_ylabel("seconds")
    right.set_title("latency by turn (history grows)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--model", default="demo")
    ap.add_argument("--device", default=None, help="the server's --device (default: its own choice)")
    ap.add_argument("--max-seq-len", type=int, default=None)
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients (64; 16 on the CPU)")
    ap.add_argument("--turns", type=int, default=None, help="turns per client (20; 5 on the CPU)")
    ap.add_argument("--max-tokens", type=int, default=None, help="max tokens per reply (32; 16 on the CPU)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--chat-share", type=float, default=0.25,
                    help="fraction of clients on /v1/chat/completions (the rest on /v1/responses)")
    ap.add_argument("--redis-url", default=None, help="Redis the server uses (default: a fresh embedded one)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--server-arg", action="append", default=[], help="one more argument for chatcore serve")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--deadline", type=float, default=1800.0, help="seconds of load; later turns are not started")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="processes the clients are spread over (one asyncio process can be the limit itself)")
    args = ap.parse_args()
    cpu = args.device == "cpu"
    args.clients = args.clients or (16 if cpu else 64)
    args.turns = args.turns or (5 if cpu else 20)
    args.max_tokens = args.max_tokens or (16 if cpu else 32)
    if not 0 <= args.chat_share <= 1:
        raise SystemExit("--chat-share must be within 0..1")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "serve_load_cpu" if cpu else "serve_load"
    home = Path(tempfile.mkdtemp(prefix="chatcore-serve-load-"))   # the server's data directory (its Redis)
    server = Server(args, home, home / "server.log")
    print(f"chatcore serve at {server.url} after {server.start_s:.1f} s ({' '.join(server.cmd[1:])})", flush=True)
    n_chat = round(args.clients * args.chat_share)
    clients = [Client(i, "chat" if i < n_chat else "responses") for i in range(args.clients)]
    try:
        model = asyncio.run(served_model(server.url, args))
        stop_at = time.perf_counter() + args.deadline
        server_cpu0 = cpu_seconds(server.proc.pid)
        clients, wall, client_cpu = run_clients(server.url, model, clients, args, stop_at)
        server_cpu1 = cpu_seconds(server.proc.pid)
    finally:
        status = server.stop()
    run = tally(clients, wall, args)
    run.update(server_start_s=server.start_s, server_exit_status=status, model=model)
    run.update(cpu_use(run, None if server_cpu0 is None or server_cpu1 is None else server_cpu1 - server_cpu0,
                       client_cpu, args.client_procs))
    run.update(check_storage(clients, args, home))
    failed = run["errors"] > 0 or run["conversations_complete"] != run["conversations"]
    if failed:   # keep the server's log for a look
        shutil.copy(home / "server.log", args.out / f"{stem}_server.log")
    shutil.rmtree(home, ignore_errors=True)
    import torch

    results = {"device": args.device or "default", "torch": torch.__version__,
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": [run]}
    problems = check_serve_json(results)
    if problems:
        results["schema_problems"] = problems
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(results, indent=1))
    plot(run, clients, args.out / f"{stem}.png")
    t, r = run["ttft_s"], run["reply_s"]
    print(f"{run['ok']}/{run['expected_requests']} requests ok, {run['errors']} errors in {wall:.1f} s "
          f"({run['requests_per_s']:.2f} req/s, {run['output_tokens_per_s']:.1f} output tok/s)\n"
          f"TTFT p50/p95/p99 {t['p50']:.3f} / {t['p95']:.3f} / {t['p99']:.3f} s; whole reply "
          f"{r['p50']:.3f} / {r['p95']:.3f} / {r['p99']:.3f} s\n"
          f"stored conversations complete: {run['conversations_complete']} of {run['conversations']}"
          + (f"; problems: {run['problems'][:3]}" if run["problems"] else "") + f"\n{path}", flush=True)
    if run["error_samples"]:
        print(f"errors: {run['error_samples'][:3]}", flush=True)
    return 1 if failed else 0


async def served_model(url: str, args: argparse.Namespace) -> str:
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=url, api_key=args.api_key or "none", max_retries=0)
    try:
        models = await api.models.list()
        return models.data[0].id
    finally:
        await api.close()


if __name__ == "__main__":
    sys.exit(main())
