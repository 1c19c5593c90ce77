"""Starting a tensor-parallel engine: rank 0 in the caller's process, ranks 1..N-1 as worker processes.

Workers are plain subprocesses (``python -m chatcore.parallel.worker``), not multiprocessing children, so a
caller's script needs no ``if __name__ == "__main__"`` guard and a UI thread may load the model. Each has
two pipes to rank 0: commands in, and ``hello`` / ``ready`` / ``error`` out. The handshake:

1. rank 0 opens and checks the checkpoint and the split (errors here start no process), opens the
   rendezvous store and starts the workers, sending each the :class:`LaunchSpec`;
2. each worker says hello once imported; rank 0 then joins the process group with them;
3. every rank loads its own shard; rank 0 waits for every ``ready``.

A worker that exits or reports an error at any point ends the start with :class:`RankFailed` and no hang:
rank 0 watches the processes while it waits, and every wait has a deadline.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import os
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch
import torch.distributed as dist

import chatcore
from chatcore.engine import Engine
from chatcore.errors import RankFailed, TensorParallelError
from chatcore.loader import check_tensors, open_checkpoint
from chatcore.parallel.comm import join, leave, master_store
from chatcore.parallel.shard import check_divides, load_shard, open_random
from chatcore.parallel.spec import LaunchSpec, default_timeout
from chatcore.runtime import pick_device, pick_dtype


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
        # the workers import the same chatcore as this process, wherever it was imported from
        root = str(Path(chatcore.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
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


def load_parallel(path: Path, n: int, device: str | torch.device | None, dtype: str | torch.dtype | None, *,
                  max_seq_len: int | None = None, prefill_chunk: int | None = None, attention: str = "auto",
                  cuda_graphs: bool = True, random_seed: int | None = None, timeout_s: float | None = None,
                  progress: Callable[[int, int], None] | None = None) -> Engine:
    """:func:`chatcore.load` with ``tensor_parallel=n``: an :class:`Engine` on rank 0 driving n-1 worker ranks.

    ``random_seed``: ``path`` is a directory holding only config.json and every rank makes random weights
    of its shard's shapes (benchmarks). ``timeout_s``: how long a collective or a start-up step may wait
    for another rank (default ``CHATCORE_TP_TIMEOUT``, else 120 s; starting the ranks may take at least 120 s).
    ``progress(done, total)``: called as rank 0 loads its shard's tensors (the others load theirs alongside).
    """
    from chatcore.parallel.model import ParallelModel

    if n < 1:
        raise TensorParallelError(f"tensor_parallel must be at least 1, got {n}")
    tokenizer = None
    if random_seed is None:
        cfg, source, tokenizer = open_checkpoint(path)
        check_tensors(path, cfg, source)
    else:
        cfg, source = open_random(path, random_seed)
    check_divides(cfg, n)
    dev = pick_device(device)
    if dev.type == "cuda":
        first, count = dev.index or 0, torch.cuda.device_count()
        if first + n > count:
            raise TensorParallelError(f"tensor_parallel={n} needs {n} GPUs (cuda:{first}..cuda:{first + n - 1}) "
                                      f"but {count} are visible; use fewer ranks")
    elif dev.type != "cpu":
        raise TensorParallelError(f"tensor parallel runs on cpu (gloo) or cuda (NCCL), not {dev.type}")
    timeout = timeout_s or default_timeout()
    spec = LaunchSpec(path=str(path), world=n, device_type=dev.type, device_index=dev.index or 0,
                      dtype=str(pick_dtype(dtype, dev)).removeprefix("torch."), max_seq_len=max_seq_len,
                      prefill_chunk=prefill_chunk, attention=attention, cuda_graphs=cuda_graphs, store_port=0,
                      timeout_s=timeout, random_seed=random_seed)
    if n == 1:
        local, cfg, runtime = load_shard(spec, 0, (cfg, source), progress)
        return Engine(local, cfg, runtime, tokenizer, source=str(path))
    if dist.is_initialized():
        gc.collect()   # an engine nobody holds any more may still own the group until it is collected
    if dist.is_initialized():
        raise TensorParallelError("this process already has a torch.distributed process group (another "
                                  "tensor-parallel engine, or the caller's own); close that engine first")
    store = master_store(spec)
    spec = dataclasses.replace(spec, store_port=store.port)
    workers = Workers(spec)
    try:
        workers.wait("hello", spec.start_timeout_s)
        join(spec, 0, store)
        local, cfg, runtime = load_shard(spec, 0, (cfg, source), progress)
        workers.wait("ready", spec.start_timeout_s)
    except BaseException as exc:
        why = None if isinstance(exc, RankFailed) else workers.diagnose(grace=1.0)
        workers.kill()
        leave(abort=True)
        if why:
            raise RankFailed(f"tensor-parallel start failed: {why}") from exc
        raise
    return Engine(ParallelModel(local, cfg, workers, store), cfg, runtime, tokenizer, source=str(path))
