"""What every model family shares: how it makes a KV cache slot for itself."""

from __future__ import annotations

from chatcore.config import ModelConfig
from chatcore.kv_cache import KVCache
from chatcore.layers.rope import Rotary
from chatcore.runtime import Runtime


class CausalLM:
    cfg: ModelConfig
    runtime: Runtime
    rotary: Rotary | None   # None for ALiBi families: their cached keys need no re-rotation on a shift

    def new_cache(self, capacity: int) -> KVCache:
        c = self.cfg
        return KVCache(num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                       capacity=capacity, dtype=self.runtime.dtype, device=self.runtime.device,
                       rotary=self.rotary)
