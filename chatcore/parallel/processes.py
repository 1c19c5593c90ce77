"""Rank 0's handle on the worker ranks 1..N-1: their processes, and two pipes to each (commands in; ``hello``
/ ``ready`` / ``error`` out).

Workers are plain subprocesses (``python -m chatcore.parallel.worker``), not multiprocessing children, so a
caller's script needs no ``if __name__ == "__main__"`` guard and a UI thread may load the model.
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path

from chatcore.errors import RankFailed
from chatcore.parallel.spec import LaunchSpec

# the workers import the same chatcore as this process, wherever it was imported from
_ROOT = str(Path(__file__).resolve().parents[2])


class Workers:
    """Rank 0's handle on ranks 1..N-1: their processes and pipes."""

    def __init__(self, spec: LaunchSpec) -> None:
        self.world = spec.world
        self.procs: list[subprocess.Popen] = []
        self.cmds: list[Connection] = []
        self.replies: list[Connection] = []
        self.errors: dict[int, str] = {}
        self._freed: collections.deque[int] = collections.deque()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        try:
            for rank in range(1, spec.world):
                cmd_r, cmd_w = os.pipe()
                reply_r, reply_w = os.pipe()
                proc = subprocess.Popen([sys.executable, "-m", "chatcore.parallel.worker", str(cmd_r), str(reply_w)],
                                        pass_fds=(cmd_r, reply_w), env=env, stdin=subprocess.DEVNULL)
                os.close(cmd_r)
                os.close(reply_w)
                self.procs.append(proc)
                self.cmds.append(Connection(cmd_w, readable=False))
                self.replies.append(Connection(reply_r, writable=False))
                self.cmds[-1].send((spec, rank))
        except BaseException:
            self.kill()
            raise

    # -- commands ---------------------------------------------------------------------------------------
    def release(self, slot: int) -> None:
        """A slot rank 0 no longer holds (called by its finalizer, from any thread): freed with the next command."""
        self._freed.append(slot)

    def send(self, msg: tuple) -> None:
        """Send one command to every worker (after any pending frees); OSError if one has gone."""
        freed = []
        while self._freed:
            freed.append(self._freed.popleft())
        for cmd in self.cmds:
            if freed:
                cmd.send(("free", *freed))
            cmd.send(msg)

    # -- watching ---------------------------------------------------------------------------------------
    def wait(self, kind: str, timeout: float) -> None:
        """Wait until every worker has sent ``kind``; :class:`RankFailed` if one fails, exits or is late."""
        deadline = time.monotonic() + timeout
        waiting = set(range(len(self.procs)))
        while waiting:
            for conn in wait([self.replies[i] for i in waiting], timeout=0.1):
                i = self.replies.index(conn)
                try:
                    msg = conn.recv()
                except EOFError:
                    msg = ("gone",)
                if msg[0] == kind:
                    waiting.discard(i)
                elif msg[0] == "error":
                    self.errors[i + 1] = msg[2]
            if self.errors or any(self.procs[i].poll() is not None for i in waiting):
                raise RankFailed(f"tensor-parallel start failed: {self.diagnose(grace=1.0)}")
            if waiting and time.monotonic() > deadline:
                late = ", ".join(str(i + 1) for i in sorted(waiting))
                raise RankFailed(f"tensor-parallel rank(s) {late} did not say {kind!r} within {timeout:.0f} s; "
                                 "raise CHATCORE_TP_TIMEOUT if loading is that slow")

    def _drain(self) -> None:
        for i, conn in enumerate(self.replies):
            try:
                while conn.poll(0):
                    msg = conn.recv()
                    if msg[0] == "error":
                        self.errors[i + 1] = msg[2]
            except (EOFError, OSError):
                continue

    def diagnose(self, grace: float = 0.0) -> str | None:
        """What went wrong with the workers, in one line (None: all alive, none reported an error).

        Ranks that died without a word (killed) come first, then the errors ranks reported; ``grace``
        seconds are given for a dying rank's exit or message to arrive."""
        deadline = time.monotonic() + grace
        while True:
            self._drain()
            silent = [(i + 1, p.returncode) for i, p in enumerate(self.procs)
                      if p.poll() is not None and (i + 1) not in self.errors]
            if silent or self.errors or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        parts = [f"rank {r} exited ({_exit_text(code)})" for r, code in silent]
        parts += [f"rank {r} failed: {text}" for r, text in sorted(self.errors.items())]
        return "; ".join(parts)[:800] if parts else None

    # -- the end ------------------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Ask the workers to exit; kill any still running after ``timeout`` seconds."""
        for cmd in self.cmds:
            with contextlib.suppress(OSError):
                cmd.send(("close",))
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for conn in self.cmds + self.replies:
            conn.close()
        self.cmds, self.replies = [], []


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"
