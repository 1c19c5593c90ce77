"""The collectives, over torch.distributed's default process group (gloo on the CPU, NCCL on CUDA; one group
per process, so one tensor-parallel engine per process at a time): the layers where a shard's forward pass
meets the other ranks, the token broadcast of a decode step, and joining / leaving the group.

Per layer: one all-reduce after the attention output projection and one after the MLP down projection; per
forward pass: one all-reduce for the vocab-parallel embedding and one all-gather of the vocab-parallel
logits. Everything here is a plain tensor op, so a CUDA graph captures it with the rest of the step.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from chatcore.kv_cache import KVCache
from chatcore.layers.linear import linear
from chatcore.models.base import CausalLM
from chatcore.parallel.spec import LaunchSpec
from chatcore.quant.weight import Weight, embedding

# torch 2.13 renamed all_gather_into_tensor (the older name still works there, with a warning)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ParallelLayers:
    """A shard's three layers that differ from the whole model's (:class:`CausalLM` ``embed_ids``,
    ``row_linear``, ``head``): rank ``rank`` of ``world`` holds vocab rows ``vocab_start ..
    vocab_start + vocab_rows`` of ``vocab`` (the last rank's padded)."""

    def __init__(self, rank: int, world: int, vocab_start: int, vocab_rows: int, vocab: int) -> None:
        self.rank, self.world = rank, world
        self.lo, self.rows, self.vocab = vocab_start, vocab_rows, vocab

    def install(self, model: CausalLM) -> CausalLM:
        """Make ``model`` (this rank's shard) run these layers."""
        model.embed_ids, model.row_linear, model.head = self.embed_ids, self.row_linear, self.head
        return model

    def embed_ids(self, ids: torch.Tensor, weight: Weight, dtype: torch.dtype) -> torch.Tensor:
        """Vocab-parallel lookup: this rank's rows (zeros for ids it does not hold), summed over ranks (a packed
        table: only the looked-up rows dequantized, to ``dtype``)."""
        local = ids - self.lo
        outside = (local < 0) | (local >= self.rows)
        x = embedding(local.masked_fill(outside, 0), weight, dtype)
        x.masked_fill_(outside.unsqueeze(-1), 0)
        dist.all_reduce(x)
        return x

    def row_linear(self, x: torch.Tensor, w: Weight, b: torch.Tensor | None = None, *,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
        """Row-parallel projection: each rank's partial product of its input columns, summed over ranks. Rank 0
        alone adds the residual (in its projection's epilogue), as it alone holds the bias: the sum has each once."""
        out = linear(x, w, b, residual=residual if self.rank == 0 else None)
        dist.all_reduce(out)
        return out

    def head(self, h: torch.Tensor, weight: Weight) -> torch.Tensor:
        """Vocab-parallel head: this rank's logits [T, rows], gathered from every rank -> [T, vocab] (the padding
        rows cut off)."""
        logits = linear(h, weight)
        t = logits.shape[0]
        out = logits.new_empty((self.world * t, self.rows))
        _all_gather(out, logits.contiguous())
        return out.view(self.world, t, self.rows).transpose(0, 1).reshape(t, self.world * self.rows)[:, : self.vocab]


class BroadcastDecode:
    """The decode step every rank captures in its CUDA graph: rank 0's sampled token, still on its device,
    broadcast to the others, then the shard's own step. (Rank 0 never reads the token before the step.)"""

    def __init__(self, model: CausalLM) -> None:
        self.model = model

    def decode(self, token: torch.Tensor, pos: torch.Tensor, slot: KVCache, span: int | None = None) -> torch.Tensor:
        dist.broadcast(token, src=0)
        return self.model.decode(token, pos, slot, span)


def master_store(spec: LaunchSpec) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free local port (``.port``)."""
    return dist.TCPStore("127.0.0.1", 0, spec.world, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=spec.start_timeout_s))


def join(spec: LaunchSpec, rank: int, store: dist.Store | None = None) -> None:
    """Join the process group of ``spec`` as ``rank`` (blocks until every rank has joined)."""
    timeout = datetime.timedelta(seconds=spec.timeout_s)
    if store is None:
        store = dist.TCPStore("127.0.0.1", spec.store_port, spec.world, is_master=False,
                              timeout=datetime.timedelta(seconds=spec.start_timeout_s))
    extra = {}
    if spec.device_type == "cuda":
        dev = spec.rank_device(rank)
        torch.cuda.set_device(dev)
        extra["device_id"] = dev
        if rank == 0:
            # rank 0 is the caller's process: on a collective past its timeout, NCCL's watchdog must abort the
            # communicator (so the stream stops waiting and the next step raises), not tear the process down
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.world, timeout=timeout, **extra)


def leave(abort: bool = False) -> None:
    """Leave the process group. ``abort`` (a peer is gone): NCCL communicators are aborted, which also ends
    collectives still waiting on the GPU for that peer; a clean destroy would wait on them."""
    if not dist.is_initialized():
        return
    if abort and dist.get_backend() == "nccl":
        with contextlib.suppress(RuntimeError, ValueError):
            dist.distributed_c10d._abort_process_group()
        if not dist.is_initialized():
            return
    dist.destroy_process_group()
