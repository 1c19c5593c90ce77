"""What a forward pass needs to know about positions: where the new tokens go in the cache, and how.

Every model family writes one ``run(ids, step)``; the step owns the positions, the RoPE rotation, the KV
cache write and the call to the attention entry point, so the same model code serves:

- :class:`EagerStep`: T tokens after the slot's current tokens, positions known on the host (prefill,
  and decode without CUDA graphs);
- :class:`DeviceStep`: one token at a position held in device memory (an int32 tensor) over a cache
  allocated to its full capacity: nothing in it reads a value back to the host, so a CUDA graph can capture
  it once and replay it at every length.
"""

from __future__ import annotations

import torch

from chatcore.kv_cache import KVCache
from chatcore.layers.attention import attention
from chatcore.layers.rope import Rotary


class EagerStep:
    def __init__(self, cache: KVCache, t: int, backend: str) -> None:
        cache.reserve(t)
        self.cache, self.t, self.start, self.backend = cache, t, cache.length, backend
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # per rotary (Gemma 3 has two)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rotary: Rotary | None,
               window: int | None = None, alibi: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] of the new tokens (k not yet rotated) -> attention output [T, Hq, D]."""
        if rotary is not None:
            tables = self._tables.get(id(rotary))
            if tables is None:
                tables = self._tables[id(rotary)] = rotary.tables(self.start, self.t, q.dtype)
            cos, sin = tables
            q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        keys, values = self.cache.write(layer, self.start, k, v)
        return attention(q, keys, values, q_offset=self.start, backend=self.backend, window=window, alibi=alibi)


class DeviceStep:
    """``span``: attend over the cache's first ``span`` rows (None: all of them); the position must lie below it."""

    def __init__(self, cache: KVCache, pos: torch.Tensor, backend: str, span: int | None = None) -> None:
        if cache.allocated != cache.capacity:
            raise ValueError("a device-position step needs a cache allocated to its full capacity")
        self.cache, self.pos, self.backend = cache, pos, backend
        self.span = cache.capacity if span is None else span

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rotary: Rotary | None,
               window: int | None = None, alibi: torch.Tensor | None = None) -> torch.Tensor:
        tables = None
        if rotary is not None:
            # flash-attn's in-kernel rotary takes tables in the query's dtype (as transformers rounds them)
            tables = rotary.full_tables(q.dtype if self.backend == "flash" else torch.float32)
        keys, values = self.cache.k[layer, :, : self.span], self.cache.v[layer, :, : self.span]
        return attention(q, keys, values, q_offset=self.pos, backend=self.backend,
                         window=window, alibi=alibi, new_kv=(k, v), rotary=tables)


Step = EagerStep | DeviceStep
