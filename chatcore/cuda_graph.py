"""The decode step as one CUDA graph: captured once per KV cache slot, replayed for every token.

The graph holds the whole single-token forward pass (embedding, every layer's projections, the in-place
cache append and attention, the head). Its inputs are two device tensors written before each replay, the
token id and its position, so a replay launches no kernel from Python and reads nothing back; the caller's
only synchronisation per token is reading the sampled id. Captures share one memory pool.
"""

from __future__ import annotations

import torch

from chatcore.kv_cache import KVCache


class DecodeGraph:
    def __init__(self, model, cache: KVCache, pool: tuple[int, int] | None = None) -> None:  # noqa: ANN001
        if cache.allocated != cache.capacity or cache.length >= cache.capacity:
            raise ValueError("a decode graph needs a preallocated slot with room for one more token")
        dev = cache.k.device
        self.cache = cache
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.full((1,), cache.length, dtype=torch.int32, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):   # warm-up: kernel compilation and library handles stay out of the capture
                model.decode(self.token, self.pos, cache)   # writes only the unused row at cache.length
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool), torch.inference_mode():
            self.logits = model.decode(self.token, self.pos, cache)

    def launch(self, token: torch.Tensor) -> torch.Tensor:
        """Queue a step on a token still on the device (0-d or [1] int64) at the slot's next position;
        returns the logits [1, vocab] it will hold. The caller commits the token once it has read it."""
        with torch.inference_mode():
            self.token.copy_(token.reshape(1))
            self.pos.fill_(self.cache.length)
            self.graph.replay()
        return self.logits

    def step(self, token: int) -> torch.Tensor:
        """Run ``token`` at the slot's next position; returns the logits [1, vocab] (valid until the next step)."""
        self.token.fill_(token)
        self.pos.fill_(self.cache.length)
        self.graph.replay()
        return self.logits
