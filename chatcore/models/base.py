"""The model interface the engine drives (:class:`CausalModel`), and what every model family shares
(:class:`CausalLM`): its KV cache slots, and the two ways a forward pass is driven.

A family implements ``run(ids, step, all_logits)`` once; :meth:`CausalLM.forward` drives it with positions
known on the host (prefill), :meth:`CausalLM.decode` with the position in device memory (CUDA graphs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from chatcore.config import ModelConfig
from chatcore.kv_cache import KVCache
from chatcore.layers.attention import sized_by_buffer
from chatcore.layers.linear import linear
from chatcore.layers.rope import Rotary
from chatcore.quant.weight import embedding
from chatcore.runtime import Runtime
from chatcore.step import DeviceStep, EagerStep, Step

if TYPE_CHECKING:
    from chatcore.cuda_graph import DecodeGraph


class DecodeStep(Protocol):
    """A slot's decode step captured as a CUDA graph: run one token at the slot's next position."""

    def launch(self, token: torch.Tensor) -> torch.Tensor:
        """Queue the step on a token still on the device; returns the logits [1, vocab] it will hold."""
        ...

    def step(self, token: int) -> torch.Tensor:
        """Run the step on ``token``; returns its logits [1, vocab]."""
        ...


@runtime_checkable
class CausalModel(Protocol):
    """What the :class:`chatcore.Engine` drives: a whole model in one process (:class:`CausalLM`), or rank 0
    of a tensor-parallel one (:class:`chatcore.parallel.model.ParallelModel`), which runs each call on every rank.

    The caller commits the token ids of a forward pass or decode step to the slot itself (``slot.commit``).
    """

    cfg: ModelConfig        # the whole model's config
    runtime: Runtime

    def new_slot(self, capacity: int, *, preallocate: bool = False) -> KVCache:
        """An empty KV cache slot of ``capacity`` tokens (``preallocate``: allocated whole, for CUDA graphs)."""
        ...

    def forward(self, ids: torch.Tensor, slot: KVCache, *, all_logits: bool = False) -> torch.Tensor:
        """Run ``ids`` [T] after the slot's current tokens; return logits [T, vocab] or [1, vocab] (last)."""
        ...

    def capture_decode(self, slot: KVCache, pool: tuple[int, int] | None = None) -> DecodeStep:
        """The slot's decode step as a CUDA graph (the slot preallocated, with room for one more token)."""
        ...

    def close(self) -> None:
        """Release what the model holds besides memory (tensor parallel: the other ranks)."""
        ...


class CausalLM:
    """A family's model, whole or (:mod:`chatcore.parallel`) one rank's shard; implements :class:`CausalModel`."""

    cfg: ModelConfig
    runtime: Runtime
    backend: str
    rotary: Rotary | None   # None for ALiBi families: their cached keys need no re-rotation on a shift

    # -- the three layers where a tensor-parallel shard differs ----------------------------------------------
    # Plain functions here, so one process runs exactly these (the residual add in the projection's epilogue);
    # a shard's instance gets its own (chatcore.parallel.comm.ParallelLayers), where the collectives live.
    embed_ids = staticmethod(embedding)     # (ids, weight, dtype) -> the embedding rows of ids [T, hidden]
    row_linear = staticmethod(linear)       # (x, w, b=None, *, residual=None) -> residual + x @ w.T + b
    head = staticmethod(linear)             # (h, weight) -> logits [T, vocab]

    def slot_args(self) -> dict[str, Any]:
        """What every KV cache slot of this model shares (all but its capacity)."""
        c, rt = self.cfg, self.runtime
        return dict(num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=rt.dtype,
                    device=rt.device, rotary=self.rotary, kv_dtype=rt.kv_dtype)

    def new_slot(self, capacity: int, *, preallocate: bool = False) -> KVCache:
        return KVCache(**self.slot_args(), capacity=capacity, preallocate=preallocate)

    def run(self, ids: torch.Tensor, step: Step, *, all_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, slot: KVCache, *, all_logits: bool = False) -> torch.Tensor:
        """Run ``ids`` [T] after the slot's current tokens; return logits [T, vocab] or [1, vocab] (last)."""
        return self.run(ids, EagerStep(slot, ids.shape[0], self.backend), all_logits=all_logits)

    def decode(self, token: torch.Tensor, pos: torch.Tensor, slot: KVCache, span: int | None = None) -> torch.Tensor:
        """One token [1] at position ``pos`` (int32 [1], device) of a fully allocated slot -> logits [1, vocab];
        attention reads the slot's first ``span`` rows (None: all; ``pos`` must lie below it).

        Reads nothing back to the host, so a CUDA graph can capture it (:mod:`chatcore.cuda_graph`).
        """
        return self.run(token, DeviceStep(slot, pos, self.backend, span))

    def capture_decode(self, slot: KVCache, pool: tuple[int, int] | None = None) -> DecodeGraph:
        """The slot's decode step captured as a CUDA graph (the engine calls this once per slot)."""
        from chatcore.cuda_graph import DecodeGraph

        return DecodeGraph(self, slot, pool, spans=sized_by_buffer(self.backend))

    def close(self) -> None:
        """Nothing to release in one process."""
