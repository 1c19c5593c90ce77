"""What every model family shares: its KV cache slots, and the two ways a forward pass is driven.

A family implements ``run(ids, step, all_logits)`` once; :meth:`CausalLM.forward` drives it with positions
known on the host (prefill), :meth:`CausalLM.decode` with the position in device memory (CUDA graphs).
"""

from __future__ import annotations

import torch

from chatcore.config import ModelConfig
from chatcore.kv_cache import KVCache
from chatcore.layers.rope import Rotary
from chatcore.runtime import Runtime
from chatcore.step import DeviceStep, EagerStep, Step


class CausalLM:
    cfg: ModelConfig
    runtime: Runtime
    backend: str
    rotary: Rotary | None   # None for ALiBi families: their cached keys need no re-rotation on a shift

    def new_cache(self, capacity: int, *, preallocate: bool = False) -> KVCache:
        c = self.cfg
        return KVCache(num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                       capacity=capacity, dtype=self.runtime.dtype, device=self.runtime.device,
                       rotary=self.rotary, preallocate=preallocate)

    def run(self, ids: torch.Tensor, step: Step, *, all_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, cache: KVCache, *, all_logits: bool = False) -> torch.Tensor:
        """Run ``ids`` [T] after the slot's current tokens; return logits [T, vocab] or [1, vocab] (last)."""
        return self.run(ids, EagerStep(cache, ids.shape[0], self.backend), all_logits=all_logits)

    def decode(self, token: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token [1] at position ``pos`` (int32 [1], device) of a fully allocated cache -> logits [1, vocab].

        Reads nothing back to the host, so a CUDA graph can capture it (:mod:`chatcore.cuda_graph`).
        """
        return self.run(token, DeviceStep(cache, pos, self.backend))
