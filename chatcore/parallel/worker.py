"""A worker rank (1 .. N-1): ``python -m chatcore.parallel.worker CMD_FD REPLY_FD``, started by rank 0.

It reads a :class:`LaunchSpec` from its command pipe, says hello, joins the process group, loads its shard,
says ready, then runs rank 0's commands in order until rank 0 says close or goes away (end of the pipe):

- ``("new", slot, capacity, preallocate)`` / ``("free", slot, ...)``: KV cache slots, mirroring rank 0's;
- ``("forward", slot, start, ids, all_logits)``: the same forward pass as rank 0, from position ``start``;
- ``("drop", slot, length, start, end)``: the same span drop (context shift) as rank 0;
- ``("capture", slot, length)`` / ``("replay", slot, pos)``: the slot's decode step as a CUDA graph (the
  token itself arrives inside the graph, broadcast from rank 0's device);
- ``("time_all_reduce", iters, numel)``: a timing loop of all-reduces (benchmarks);
- ``("close",)``.

Its weights, caches and the results of its forward passes stay here; only the collectives connect it to
the other ranks. On an error it sends ``("error", message)`` and exits, which the other ranks see as a peer
leaving.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from chatcore.errors import ChatcoreError
from chatcore.kv_cache import KVCache
from chatcore.parallel.comm import BroadcastDecode, join, leave
from chatcore.parallel.shard import load_shard
from chatcore.parallel.spec import LaunchSpec


class Worker:
    def __init__(self, spec: LaunchSpec, rank: int) -> None:
        self.spec, self.rank = spec, rank
        self.model, _, self.runtime = load_shard(spec, rank)
        self.slots: dict[int, KVCache] = {}
        self.graphs: dict[int, object] = {}
        self.pool = None

    def serve(self, cmd: Connection) -> None:
        while True:
            op, *args = cmd.recv()
            if op == "close":
                return
            getattr(self, f"_{op}")(*args)

    def _new(self, slot: int, capacity: int, preallocate: bool) -> None:
        self.slots[slot] = self.model.new_cache(capacity, preallocate=preallocate)

    def _free(self, *slots: int) -> None:
        for s in slots:
            self.slots.pop(s, None)
            self.graphs.pop(s, None)

    def _cache(self, slot: int, length: int) -> KVCache:
        """The slot, cut back to rank 0's ``length`` (its tokens here are placeholders; only the count matters)."""
        cache = self.slots[slot]
        if length > cache.length:
            raise RuntimeError(f"slot {slot} holds {cache.length} tokens here but {length} on rank 0")
        cache.truncate(length)
        return cache

    @torch.inference_mode()
    def _forward(self, slot: int, start: int, ids: list[int], all_logits: bool) -> None:
        cache = self._cache(slot, start)
        self.model.forward(torch.tensor(ids, dtype=torch.long, device=self.runtime.device), cache,
                           all_logits=all_logits)
        cache.commit(ids)

    def _drop(self, slot: int, length: int, start: int, end: int) -> None:
        self._cache(slot, length).drop(start, end)

    def _capture(self, slot: int, length: int) -> None:
        from chatcore.cuda_graph import DecodeGraph
        from chatcore.layers.attention import sized_by_buffer

        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        self.graphs[slot] = DecodeGraph(BroadcastDecode(self.model), self._cache(slot, length), self.pool,
                                        spans=sized_by_buffer(self.model.backend))

    def _replay(self, slot: int, pos: int) -> None:
        cache = self._cache(slot, pos)
        self.graphs[slot].step(0)   # the token is overwritten in the graph by rank 0's broadcast
        cache.commit([-1])

    def _time_all_reduce(self, iters: int, numel: int) -> None:
        x = torch.zeros((1, numel), dtype=self.runtime.dtype, device=self.runtime.device)
        for _ in range(iters + 1):
            dist.all_reduce(x)
        if x.is_cuda:
            torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = Connection(int(argv[0]), writable=False)
    reply = Connection(int(argv[1]), readable=False)
    rank = -1
    try:
        # rank 0 decides when this rank ends: a terminal's Ctrl-C reaches rank 0, which stops the workers itself
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        spec, rank = cmd.recv()
        if spec.device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
        reply.send(("hello", rank))
        join(spec, rank)
        worker = Worker(spec, rank)
        reply.send(("ready", rank))
        worker.serve(cmd)
        leave()
        return 0
    except EOFError:
        return 0   # rank 0 closed its end: it finished, or it is gone
    except BaseException as exc:   # every failure is reported to rank 0 before this rank exits
        if not isinstance(exc, (ChatcoreError, RuntimeError, KeyboardInterrupt)):
            traceback.print_exc()
        with contextlib.suppress(OSError):
            reply.send(("error", rank, f"{type(exc).__name__}: {exc}".splitlines()[0][:500]))
        return 1


if __name__ == "__main__":
    code = main()
    # exit at once: a failed rank must not wait in torch.distributed's teardown for peers that may be gone
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
