"""The decode step as one CUDA graph: captured once per KV cache slot, replayed for every token.

The graph holds the whole single-token forward pass (embedding, every layer's projections, the in-place
cache append and attention, the head). Its inputs are two device tensors written before each replay, the
token id and its position, so a replay launches no kernel from Python and reads nothing back; the caller's
only synchronisation per token is reading the sampled id. Captures share one memory pool.

**Spans.** Where the attention kernel sizes its work from the cache buffer it is handed (flash-attn chooses
its split over keys from the buffer's length; the torch and math backends mask the whole buffer), a graph
over the whole slot would pay for its capacity at every length: flash-attn's decode kernel at 512 live
tokens of a 33k slot leaves most of the GPU idle. Those backends get one graph per *span*, a power of two
from 512 up to the capacity, each attending over the first ``span`` rows of the cache; a step replays the
smallest span that holds its position, captured the first time it is needed. The triton backend's kernels
bound their loops by the live length read on the device, so one graph over the capacity serves every length.
"""

from __future__ import annotations

from typing import Protocol

import torch

from chatcore.kv_cache import KVCache

MIN_SPAN = 512


class Decoder(Protocol):
    """What a graph captures: a model's device-position decode step (``CausalLM.decode``)."""

    def decode(self, token: torch.Tensor, pos: torch.Tensor, slot: KVCache, span: int | None = None) -> torch.Tensor:
        ...


def span_for(position: int, capacity: int, spans: bool) -> int:
    """Cache rows the step at ``position`` attends over: the smallest span holding it (see the module doc)."""
    if not spans:
        return capacity
    span = MIN_SPAN
    while span <= position:
        span *= 2
    return min(span, capacity)


class DecodeGraph:
    """``spans``: one graph per span (backends whose kernels size their work from the buffer), else one."""

    def __init__(self, model: Decoder, slot: KVCache, pool: tuple[int, int] | None = None, *,
                 spans: bool = False) -> None:
        if slot.allocated != slot.capacity or slot.length >= slot.capacity:
            raise ValueError("a decode graph needs a preallocated slot with room for one more token")
        dev = slot.k.device
        self.model, self.slot, self.pool, self.spans = model, slot, pool, spans
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.full((1,), slot.length, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.current()

    def current(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The graph (and its logits) for the slot's next position, captured on first use."""
        span = span_for(self.slot.length, self.slot.capacity, self.spans)
        if span in self.graphs:
            return self.graphs[span]
        dev, model, slot = self.slot.k.device, self.model, self.slot
        self.pos.fill_(slot.length)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):   # warm-up: kernel compilation and library handles stay out of the capture
                model.decode(self.token, self.pos, slot, span)   # writes only the unused row at slot.length
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
            logits = model.decode(self.token, self.pos, slot, span)
        self.graphs[span] = graph, logits
        return graph, logits

    def launch(self, token: torch.Tensor) -> torch.Tensor:
        """Queue a step on a token still on the device (0-d or [1] int64) at the slot's next position;
        returns the logits [1, vocab] it will hold. The caller commits the token once it has read it."""
        with torch.inference_mode():
            graph, logits = self.current()
            self.token.copy_(token.reshape(1))
            self.pos.fill_(self.slot.length)
            graph.replay()
        return logits

    def step(self, token: int) -> torch.Tensor:
        """Run ``token`` at the slot's next position; returns the logits [1, vocab] (valid until the next step)."""
        graph, logits = self.current()
        self.token.fill_(token)
        self.pos.fill_(self.slot.length)
        graph.replay()
        return logits
