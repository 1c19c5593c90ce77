"""What every rank runs: :class:`ShardRunner`, one rank's shard and its KV cache slots by id, whose methods are
the ops of a tensor-parallel model. Rank 0 calls each op through :meth:`ParallelModel.call
<chatcore.parallel.model.ParallelModel.call>`, which first sends ``(op, *args)`` to the workers; a worker calls
the same method with the same arguments (:mod:`chatcore.parallel.worker`). So every rank runs the same ops in
the same order, and its forward passes meet the others' in the same collectives.

An op's keyword arguments are rank 0's alone: what reaches the other ranks through a collective (the sampled
token, broadcast inside the decode graph) or exists on rank 0 only (its slot objects, the prompt already on
its device, the engine's graph pool).

A slot's token ids live on rank 0; each op brings rank 0's token count for the slot, and a worker's slot holds
that many placeholders (only the count matters to a forward pass).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import MutableMapping

import torch
import torch.distributed as dist

from chatcore.cuda_graph import DecodeGraph
from chatcore.kv_cache import KVCache
from chatcore.layers.attention import sized_by_buffer
from chatcore.models.base import CausalLM
from chatcore.parallel.comm import BroadcastDecode


class ShardRunner:
    """``weak``: rank 0, whose slots belong to its callers (a slot nobody holds any more is freed on the
    workers by the ``free`` op); a worker's slots and their graphs live here until then."""

    def __init__(self, model: CausalLM, *, weak: bool = False) -> None:
        self.model = model
        self.slots: MutableMapping[int, KVCache] = weakref.WeakValueDictionary() if weak else {}
        self.graphs: MutableMapping[int, DecodeGraph] = weakref.WeakValueDictionary() if weak else {}
        self._pool: tuple[int, int] | None = None

    def _at(self, sid: int, length: int) -> KVCache:
        """Slot ``sid`` holding rank 0's ``length`` tokens (rank 0's always does)."""
        slot = self.slots[sid]
        if length <= slot.length:
            slot.truncate(length)
        else:
            slot.commit([-1] * (length - slot.length))   # what this rank's last forward pass wrote
        return slot

    # -- the ops ----------------------------------------------------------------------------------------------
    def new_slot(self, sid: int, capacity: int, preallocate: bool, *, slot: KVCache | None = None) -> KVCache:
        """A slot of ``capacity`` tokens as slot ``sid`` (``slot``: rank 0's own, made by the caller)."""
        self.slots[sid] = slot if slot is not None else self.model.new_slot(capacity, preallocate=preallocate)
        return self.slots[sid]

    def free(self, *sids: int) -> None:
        for sid in sids:
            self.slots.pop(sid, None)
            self.graphs.pop(sid, None)

    @torch.inference_mode()
    def forward(self, sid: int, start: int, ids: list[int], all_logits: bool, *,
                x: torch.Tensor | None = None) -> torch.Tensor:
        """``ids`` after the slot's first ``start`` tokens (``x``: them as a tensor already on the device)."""
        slot = self._at(sid, start)
        if x is None:
            x = torch.tensor(ids, dtype=torch.long, device=self.model.runtime.device)
        return self.model.forward(x, slot, all_logits=all_logits)

    def drop(self, sid: int, length: int, start: int, end: int) -> None:
        """Drop ``start .. end-1`` from the slot (a context shift). The storage's own drop: rank 0's slot sends
        its drops here."""
        KVCache.drop(self._at(sid, length), start, end)

    def capture(self, sid: int, length: int, *, pool: tuple[int, int] | None = None) -> DecodeGraph:
        """The slot's decode step as a CUDA graph, the token broadcast from rank 0 inside it."""
        if pool is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            pool = self._pool
        graph = DecodeGraph(BroadcastDecode(self.model), self._at(sid, length), pool,
                            spans=sized_by_buffer(self.model.backend))
        self.graphs[sid] = graph
        return graph

    def replay(self, sid: int, pos: int, *, token: torch.Tensor | int = 0) -> torch.Tensor:
        """The slot's captured step at position ``pos``; the token only matters on rank 0 (the graph broadcasts
        it): a device tensor is queued (``launch``), an int run (``step``)."""
        self._at(sid, pos)
        graph = self.graphs[sid]
        return graph.launch(token) if isinstance(token, torch.Tensor) else graph.step(token)

    def time_all_reduce(self, iters: int, numel: int) -> float:
        """Seconds per all-reduce of ``numel`` elements, timed over ``iters`` after one warm-up (benchmarks)."""
        rt = self.model.runtime
        x = torch.zeros((1, numel), dtype=rt.dtype, device=rt.device)
        dist.all_reduce(x)
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        sync()
        return (time.perf_counter() - t0) / iters
