"""Batched decode steps as CUDA graphs: one graph per batch-size bucket, replayed for every decode-only step.

The single-sequence version is :mod:`chatcore.cuda_graph`; this one captures
``model.run(tokens, DeviceBatchStep(...))`` for B sequences x one token over a
:class:`~chatcore.batch.paged.PagedPool`. A step of B live sequences replays the smallest bucket (1, 2, 4, 8,
16, 32, 64, ..., and ``max_batch`` itself) that holds B, captured the first time it is needed; all buckets
share one graph memory pool and one set of static device buffers (each bucket reads their first rows):

- ``tokens`` int64 [max_batch], ``positions`` int32 [max_batch] (each token's position), ``tables`` int32
  [max_batch, width] (block tables padded with the scratch block 0), ``seq_lens`` int32 [max_batch]
  (positions + 1), and the bucket's ``cu_q`` (0 .. bucket);
- rows past the live batch are padding aimed at the scratch block: token 0, position 0, a table of zeros,
  length 1. Their key and value land in block 0 (never allocated to a sequence) and they attend only to it, so
  they change nothing a live row reads; their logits are dropped.

The table width is fixed per object (``width`` blocks: the longest sequence the model's window allows), so
each graph's grid is fixed; the attention kernels read each sequence's length from ``seq_lens`` and bound their
loops by it (:mod:`chatcore.layers.triton_paged`, flash-attn's paged decode), so one graph serves every length.
Only backends that read lengths on the device can be captured: ``triton`` and ``flash``.

Per step the host writes the live rows into pinned staging buffers (each table row only up to its sequence's
blocks, zeros kept behind them) and copies them to the device in one copy per buffer, then replays; nothing is
read back except by the caller (the logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chatcore.batch.paged import PagedPool, PagedSlot
from chatcore.batch.step import DeviceBatchStep
from chatcore.models.base import CausalLM

GRAPH_BACKENDS = ("triton", "flash")   # kernels that read sequence lengths on the device
DEFAULT_MAX_BATCH = 64                 # static buffers' rows; a larger decode batch runs eagerly


def buckets(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for: powers of two below ``max_batch``, then ``max_batch``."""
    if max_batch <= 0:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


def decode_graphs(model: CausalLM, pool: PagedPool, max_batch: int = DEFAULT_MAX_BATCH) -> BatchDecodeGraphs | None:
    """The graphs a :class:`~chatcore.batch.paged_runner.PagedRunner` replays for decode-only batches, or None
    where they do not apply (no CUDA, CUDA graphs off in the model's runtime, a backend that reads lengths on
    the host)."""
    if not (pool.device.type == "cuda" and model.runtime.uses_cuda_graphs and model.backend in GRAPH_BACKENDS):
        return None
    return BatchDecodeGraphs(model, pool, max_batch)


class BatchDecodeGraphs:
    """The decode steps of ``model`` over ``pool`` for up to ``max_batch`` sequences, as CUDA graphs.
    ``width``: block-table entries per sequence (default: enough for the model's ``max_seq_len``);
    ``graph_pool``: a CUDA graph memory pool handle to share (default: a new one). ``capture=False``: no CUDA
    graph, each step runs the same forward eagerly over the same static buffers and padding (any device; the
    CPU tests check the buffers, padding and runner hook this way)."""

    def __init__(self, model: CausalLM, pool: PagedPool, max_batch: int, *, width: int | None = None,
                 graph_pool: tuple[int, int] | None = None, capture: bool = True) -> None:
        if capture and pool.device.type != "cuda":
            raise ValueError("batched decode graphs need a CUDA pool")
        if model.backend not in GRAPH_BACKENDS:
            raise ValueError(f"attention backend {model.backend!r} reads lengths on the host; graphs need "
                             f"{' or '.join(GRAPH_BACKENDS)}")
        self.model, self.pool, self.max_batch = model, pool, max_batch
        self.buckets = buckets(max_batch)
        self.width = width or -(-model.runtime.max_seq_len // pool.block_size)
        dev = pool.device
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(max_batch, self.width, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.cu_q = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)
        self.capture = capture
        pin = capture and torch.cuda.is_available()
        self._host = {name: torch.zeros(buf.shape, dtype=buf.dtype, pin_memory=pin)
                      for name, buf in (("tokens", self.tokens), ("positions", self.positions),
                                        ("tables", self.tables), ("seq_lens", self.seq_lens))}
        # numpy views of the staging buffers: the per-row writes below are numpy stores (~0.1 us), not torch
        # element ops (a few us each, and a step writes ~5 a row)
        self._np = {name: buf.numpy() for name, buf in self._host.items()}
        self._filled = [0] * max_batch   # entries of each staging table row that may be nonzero
        self.graph_pool = graph_pool if graph_pool is not None or not capture else torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        # the last step's host-to-device copies are done: the staging buffers can be written again
        self._copied = torch.cuda.Event() if capture else None

    def takes(self, n: int) -> bool:
        """Whether a decode step of ``n`` sequences replays a graph here (else it runs eagerly)."""
        return 0 < n <= self.max_batch

    def bucket(self, n: int) -> int:
        """The smallest bucket holding ``n`` live sequences."""
        if not 0 < n <= self.max_batch:
            raise ValueError(f"a batched decode graph takes 1 .. {self.max_batch} sequences, got {n}")
        return next(b for b in self.buckets if b >= n)

    def _forward(self, size: int) -> torch.Tensor:
        step = DeviceBatchStep(self.pool, self.positions[:size], self.tables[:size], self.seq_lens[:size],
                               self.model.backend, cu_q=self.cu_q[: size + 1])
        return self.model.run(self.tokens[:size], step)

    def graph(self, size: int) -> tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]:
        """The graph of bucket ``size`` and the logits [size, vocab] it writes, captured on first use (with every
        row padding while it warms up and captures: only the scratch block is written)."""
        if size in self.graphs:
            return self.graphs[size]
        if not self.capture:
            self.graphs[size] = None, None
            return self.graphs[size]
        self._pad(0)
        dev = self.pool.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):   # warm-up: kernel compilation, run-time kernel choices, library handles
                self._forward(size)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool), torch.inference_mode():
            logits = self._forward(size)
        self.graphs[size] = graph, logits
        return graph, logits

    def _pad(self, live: int) -> None:
        """Rows ``live ..`` of the device buffers: padding on the scratch block."""
        self.tokens[live:] = 0
        self.positions[live:] = 0
        self.tables[live:] = 0
        self.seq_lens[live:] = 1

    def run(self, slots: Sequence[PagedSlot], tokens: Sequence[int] | torch.Tensor, *,
            greedy: bool = False) -> torch.Tensor:
        """One decode step: token ``tokens[b]`` at position ``slots[b].length`` of each slot (each reserved for
        it: :meth:`PagedSlot.reserve`); ``tokens`` from the host, or a device tensor (e.g. the last step's
        argmax: nothing waits for it on the host). Returns float32 logits [B, vocab] (a copy: the graph's own
        output is overwritten by the next replay), or with ``greedy`` each row's argmax, int64 [B] on the
        device (the step's work queued, not waited for). Commits nothing (the caller does)."""
        n = len(slots)
        if len(tokens) != n:
            raise ValueError("one token per slot")
        on_device = isinstance(tokens, torch.Tensor)
        size = self.bucket(n)
        graph, logits = self.graph(size)
        h = self._host
        if self._copied is not None:
            self._copied.synchronize()
        tok, pos, lens, tab = (self._np[k] for k in ("tokens", "positions", "seq_lens", "tables"))
        filled, width = self._filled, self.width
        for b, slot in enumerate(slots):
            length = slot.length
            if slot.allocated <= length:
                raise ValueError(f"slot {b} was not reserved for its next token")
            blocks = slot.blocks
            nb = len(blocks)
            if nb > width:
                raise ValueError(f"slot {b} holds {nb} blocks, more than the tables' {width}")
            if not on_device:
                tok[b] = tokens[b]
            pos[b] = length
            lens[b] = length + 1
            tab[b, :nb] = blocks
            if filled[b] > nb:    # the row held a longer table: zeros past this one's end
                tab[b, nb: filled[b]] = 0
            filled[b] = nb
        tok[n:size] = 0
        pos[n:size] = 0
        lens[n:size] = 1
        for b in range(n, size):
            if filled[b]:
                tab[b, : filled[b]] = 0
                filled[b] = 0
        with torch.inference_mode():
            for name in ("tokens", "positions", "seq_lens", "tables"):
                getattr(self, name)[:size].copy_(h[name][:size], non_blocking=True)
            if on_device:
                self.tokens[:n].copy_(tokens)
            if graph is None:   # capture=False
                logits = self._forward(size)
            else:
                self._copied.record()
                graph.replay()
            return logits[:n].argmax(dim=-1) if greedy else logits[:n].to(torch.float32, copy=True)
