"""Rank 0's model: what the :class:`Engine` holds with tensor parallel (a :class:`CausalModel`). Each call is
one op of :class:`ShardRunner`, dispatched by :meth:`ParallelModel.call`: sent to the worker ranks, then run
here on rank 0's own shard, so the caller talks to rank 0 alone and every rank's slots mirror rank 0's. The
data (embeddings, partial sums, logits, and in a CUDA graph the sampled token) moves only through the
collectives.

Any failure inside an op (a rank that died, a collective past its timeout, an interrupt between two
collectives) leaves the ranks out of step, so it closes the engine: the other ranks are stopped and every
later call raises :class:`RankFailed`.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from chatcore.config import ModelConfig
from chatcore.cuda_graph import DecodeGraph
from chatcore.errors import RankFailed
from chatcore.kv_cache import KVCache
from chatcore.parallel.comm import leave
from chatcore.parallel.processes import Workers
from chatcore.parallel.runner import ShardRunner


class ShardSlot(KVCache):
    """Rank 0's KV cache slot (its shard's heads); every worker holds one of the same id. Its drop (a context
    shift) runs on every rank; its other verbs are rank 0's bookkeeping (the token ids live here)."""

    def __init__(self, owner: ParallelModel, slot_id: int, capacity: int, preallocate: bool) -> None:
        super().__init__(**owner.runner.model.slot_args(), capacity=capacity, preallocate=preallocate)
        self.owner, self.slot_id = owner, slot_id
        weakref.finalize(self, owner.workers.release, slot_id)

    def drop(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self.length:   # checked before any rank starts: a bad call closes nothing
            raise ValueError(f"cannot drop [{start}, {end}) from a slot of {self.length} tokens")
        if start < end:
            self.owner.call("drop", self.slot_id, self.length, start, end)


class ParallelGraph:
    """Rank 0's captured decode step of a slot: each run replays every rank's graph at the slot's position."""

    def __init__(self, owner: ParallelModel, slot: ShardSlot, graph: DecodeGraph) -> None:
        self.owner, self.slot = owner, slot
        self.graph = graph   # kept alive here: rank 0's runner holds it weakly

    def launch(self, token: torch.Tensor | int) -> torch.Tensor:
        return self.owner.call("replay", self.slot.slot_id, self.slot.length, token=token)

    step = launch


class ParallelModel:
    def __init__(self, runner: ShardRunner, cfg: ModelConfig, workers: Workers, store: object) -> None:
        self.runner, self.cfg, self.workers = runner, cfg, workers
        self.runtime = runner.model.runtime
        self.world = workers.world
        self._store = store   # the rendezvous store lives as long as the group
        self._lock = threading.RLock()
        self._closed: str | None = None
        self._last_slot = 0
        self._finalizer = weakref.finalize(self, _shut_down, workers)

    def call(self, op: str, *args: Any, **local: Any) -> Any:
        """Run ``op`` (a :class:`ShardRunner` method) on every rank: ``(op, *args)`` goes to the workers, then
        rank 0 runs it with ``local`` too (its own inputs, see :mod:`chatcore.parallel.runner`)."""
        with self._guard():
            self.workers.send((op, *args))
            return getattr(self.runner, op)(*args, **local)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """One op of every rank, in order; a failure inside it closes the engine (see the module doc)."""
        with self._lock:
            if self._closed is not None:
                raise RankFailed(self._closed)
            try:
                yield
            except BaseException as exc:
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        why = self.workers.diagnose(grace=1.0 if isinstance(exc, (RuntimeError, OSError)) else 0.0)
        if why is None and isinstance(exc, (RuntimeError, OSError)):
            why = (f"a collective failed or waited past its timeout ({str(exc).splitlines()[0][:300]}); "
                   "another rank is stuck or gone")
        self._closed = f"tensor-parallel {why or 'step interrupted'}: the engine is closed, load the model again"
        self.workers.kill()   # they are out of step with rank 0: no goodbye
        self._finalizer.detach()
        _shut_down(self.workers, abort=True)
        if why is None:
            raise exc   # not the ranks' doing (an interrupt, a bug): the caller sees it as it is
        raise RankFailed(self._closed) from exc

    # -- the model interface (CausalModel) ------------------------------------------------------------------
    def new_slot(self, capacity: int, *, preallocate: bool = False) -> ShardSlot:
        with self._lock:
            self._last_slot += 1
            sid = self._last_slot
        slot = ShardSlot(self, sid, capacity, preallocate)
        return self.call("new_slot", sid, capacity, preallocate, slot=slot)

    def forward(self, ids: torch.Tensor, slot: ShardSlot, *, all_logits: bool = False) -> torch.Tensor:
        slot.reserve(ids.shape[0])   # a prompt too long for the slot fails here, before any rank starts
        return self.call("forward", slot.slot_id, slot.length, ids.tolist(), all_logits, x=ids)

    def capture_decode(self, slot: ShardSlot, pool: tuple[int, int] | None = None) -> ParallelGraph:
        return ParallelGraph(self, slot, self.call("capture", slot.slot_id, slot.length, pool=pool))

    def close(self) -> None:
        """Stop the workers and leave the process group (idempotent); the engine is unusable afterwards."""
        with self._lock:
            if self._closed is None:
                self._closed = "this tensor-parallel engine was closed; load the model again"
            self._finalizer()

    # -- measurements ---------------------------------------------------------------------------------------
    def time_all_reduce(self, iters: int = 200, numel: int | None = None) -> float:
        """Seconds per all-reduce of one token's hidden state (what each block of a decode step runs twice)."""
        return self.call("time_all_reduce", iters, numel or self.cfg.hidden_size)


def _shut_down(workers: Workers, abort: bool = False) -> None:
    workers.close()
    # a group whose peers are gone may refuse a clean teardown; the process keeps nothing of it
    with contextlib.suppress(RuntimeError):
        leave(abort)
