"""Rank 0's model: what the :class:`Engine` holds with tensor parallel. It has the model's interface
(``new_cache``, ``forward``, ``decode``, ``capture_decode``) and runs each step on its own shard after telling
the worker ranks to run the same step, so the caller talks to rank 0 alone and every rank's KV cache slots
mirror rank 0's.

The protocol is rank 0's command stream (see :mod:`chatcore.parallel.worker`); the data (embeddings,
partial sums, logits, and on CUDA graphs the sampled token) moves only through the collectives. A slot's
token ids live on rank 0: a worker is told the start position of each forward pass, and a span dropped by
a context shift (``slot.drop``) is dropped on every rank.

Any failure inside a step (a rank that died, a collective past its timeout, an interrupt between two
collectives) leaves the ranks out of step, so it closes the engine: the other ranks are stopped and every
later call raises :class:`RankFailed`.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Iterator

import torch
import torch.distributed as dist

from chatcore.config import ModelConfig
from chatcore.errors import RankFailed
from chatcore.kv_cache import KVCache
from chatcore.layers.attention import sized_by_buffer
from chatcore.models.base import CausalLM
from chatcore.parallel.comm import BroadcastDecode, leave
from chatcore.parallel.launch import Workers


class ShardSlot(KVCache):
    """A KV cache slot on rank 0 (its shard's heads), mirrored by a slot of the same id on every worker."""

    def __init__(self, owner: ParallelModel, slot_id: int, **cache: object) -> None:
        super().__init__(**cache)
        self.owner, self.slot_id = owner, slot_id
        weakref.finalize(self, owner.workers.release, slot_id)

    def drop(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"cannot drop [{start}, {end}) from a slot of {self.length} tokens")
        if start == end:
            return
        with self.owner.guard():
            self.owner.workers.send(("drop", self.slot_id, self.length, start, end))
            super().drop(start, end)


class ParallelGraph:
    """Rank 0's captured decode step: each launch tells the workers to replay theirs at the same position."""

    def __init__(self, owner: ParallelModel, cache: ShardSlot, graph) -> None:  # noqa: ANN001 - a DecodeGraph
        self.owner, self.cache, self.graph = owner, cache, graph

    def launch(self, token: torch.Tensor) -> torch.Tensor:
        with self.owner.guard():
            self.owner.workers.send(("replay", self.cache.slot_id, self.cache.length))
            return self.graph.launch(token)

    def step(self, token: int) -> torch.Tensor:
        with self.owner.guard():
            self.owner.workers.send(("replay", self.cache.slot_id, self.cache.length))
            return self.graph.step(token)


class ParallelModel:
    def __init__(self, local: CausalLM, cfg: ModelConfig, workers: Workers, store: object) -> None:
        self.local, self.cfg, self.workers = local, cfg, workers
        self.runtime, self.backend, self.rotary = local.runtime, local.backend, local.rotary
        self.world = workers.world
        self._store = store   # the rendezvous store lives as long as the group
        self._lock = threading.RLock()
        self._closed: str | None = None
        self._slots = 0
        self._finalizer = weakref.finalize(self, _shut_down, workers)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """One step of every rank, in order; a failure inside it closes the engine (see the module doc)."""
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

    def close(self) -> None:
        """Stop the workers and leave the process group (idempotent); the engine is unusable afterwards."""
        with self._lock:
            if self._closed is None:
                self._closed = "this tensor-parallel engine was closed; load the model again"
            self._finalizer()

    # -- the model interface the Engine uses ------------------------------------------------------------
    def new_cache(self, capacity: int, *, preallocate: bool = False) -> ShardSlot:
        c = self.local.cfg
        with self.guard():
            self._slots += 1
            self.workers.send(("new", self._slots, capacity, preallocate))
            return ShardSlot(self, self._slots, num_layers=c.num_layers, num_kv_heads=c.num_kv_heads,
                             head_dim=c.head_dim, capacity=capacity, dtype=self.runtime.dtype,
                             device=self.runtime.device, rotary=self.rotary, preallocate=preallocate)

    def forward(self, ids: torch.Tensor, cache: ShardSlot, *, all_logits: bool = False) -> torch.Tensor:
        cache.reserve(ids.shape[0])   # a prompt too long for the slot fails here, before any rank starts
        with self.guard():
            self.workers.send(("forward", cache.slot_id, cache.length, ids.tolist(), all_logits))
            return self.local.forward(ids, cache, all_logits=all_logits)

    def decode(self, token: torch.Tensor, pos: torch.Tensor, cache: ShardSlot, span: int | None = None) -> torch.Tensor:
        return BroadcastDecode(self.local).decode(token, pos, cache, span)

    def capture_decode(self, cache: ShardSlot, pool: tuple[int, int] | None = None) -> ParallelGraph:
        from chatcore.cuda_graph import DecodeGraph

        with self.guard():
            self.workers.send(("capture", cache.slot_id, cache.length))
            graph = DecodeGraph(BroadcastDecode(self.local), cache, pool, spans=sized_by_buffer(self.backend))
        return ParallelGraph(self, cache, graph)

    # -- measurements ---------------------------------------------------------------------------------------
    def time_all_reduce(self, iters: int = 200, numel: int | None = None) -> float:
        """Seconds per all-reduce of one token's hidden state (what each block of a decode step runs twice)."""
        numel = numel or self.cfg.hidden_size
        with self.guard():
            self.workers.send(("time_all_reduce", iters, numel))
            x = torch.zeros((1, numel), dtype=self.runtime.dtype, device=self.runtime.device)
            dist.all_reduce(x)
            sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(x)
            sync()
            return (time.perf_counter() - t0) / iters


def _shut_down(workers: Workers, abort: bool = False) -> None:
    workers.close()
    # a group whose peers are gone may refuse a clean teardown; the process keeps nothing of it
    with contextlib.suppress(RuntimeError):
        leave(abort)
