"""What every model family shares: its KV cache slots, and the two ways a forward pass is driven.

A family implements ``run(ids, step, all_logits)`` once; :meth:`CausalLM.forward` drives it with positions
known on the host (prefill), :meth:`CausalLM.decode` with the position in device memory (CUDA graphs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from chatcore.config import ModelConfig
from chatcore.kv_cache import KVCache
from chatcore.layers.attention import sized_by_buffer
from chatcore.layers.linear import linear
from chatcore.layers.rope import Rotary
from chatcore.runtime import Runtime
from chatcore.step import DeviceStep, EagerStep, Step

if TYPE_CHECKING:
    from chatcore.cuda_graph import DecodeGraph
    from chatcore.parallel.comm import Collectives


class CausalLM:
    cfg: ModelConfig
    runtime: Runtime
    backend: str
    rotary: Rotary | None   # None for ALiBi families: their cached keys need no re-rotation on a shift
    # tensor parallel: this rank's collectives (None: the whole model in one process). A shard's weights hold its
    # own heads / MLP columns / vocab rows; :mod:`chatcore.parallel` sets this and the per-rank config
    tp: Collectives | None = None

    def new_cache(self, capacity: int, *, preallocate: bool = False) -> KVCache:
        c = self.cfg
        return KVCache(num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                       capacity=capacity, dtype=self.runtime.dtype, device=self.runtime.device,
                       rotary=self.rotary, preallocate=preallocate)

    @staticmethod
    def outer_names(cfg: ModelConfig) -> list[str]:
        """The Hugging Face names around the layers of a ``model.*`` checkpoint: embedding, final norm, and
        the head unless it is tied to the embedding (the start of a family's ``tensor_names``)."""
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        return names if cfg.tie_word_embeddings else [*names, "lm_head.weight"]

    # -- the three places a tensor-parallel shard differs (identity without ``tp``) ----------------------
    def embed_ids(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Embedding rows of ``ids``; a vocab-parallel shard looks up its own rows and sums across ranks."""
        return F.embedding(ids, weight) if self.tp is None else self.tp.embed(ids, weight)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The output of a row-parallel projection (attention output, MLP down): summed across ranks."""
        return x if self.tp is None else self.tp.all_reduce(x)

    def head(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Logits [T, vocab]; a vocab-parallel shard computes its slice and gathers the others'."""
        logits = linear(h, weight)
        return logits if self.tp is None else self.tp.gather_vocab(logits)

    def run(self, ids: torch.Tensor, step: Step, *, all_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, cache: KVCache, *, all_logits: bool = False) -> torch.Tensor:
        """Run ``ids`` [T] after the slot's current tokens; return logits [T, vocab] or [1, vocab] (last)."""
        return self.run(ids, EagerStep(cache, ids.shape[0], self.backend), all_logits=all_logits)

    def decode(self, token: torch.Tensor, pos: torch.Tensor, cache: KVCache, span: int | None = None) -> torch.Tensor:
        """One token [1] at position ``pos`` (int32 [1], device) of a fully allocated cache -> logits [1, vocab];
        attention reads the cache's first ``span`` rows (None: all; ``pos`` must lie below it).

        Reads nothing back to the host, so a CUDA graph can capture it (:mod:`chatcore.cuda_graph`).
        """
        return self.run(token, DeviceStep(cache, pos, self.backend, span))

    def capture_decode(self, cache: KVCache, pool: tuple[int, int] | None = None) -> DecodeGraph:
        """The slot's decode step captured as a CUDA graph (the engine calls this once per slot)."""
        from chatcore.cuda_graph import DecodeGraph

        return DecodeGraph(self, cache, pool, spans=sized_by_buffer(self.backend))
