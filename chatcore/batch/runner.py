"""The contract of a batched forward pass: what the scheduler hands a runner, and what it gets back.

A runner owns the sequences' KV memory. The scheduler asks it for a slot per sequence (``new_slot``), hands it
one :class:`Work` per sequence with new tokens each step (a decode step's one token, or a prompt chunk) and gets
the logits of each work's last token, in the order given; the runner commits each work's ids to its slot.
A slot has the verb API of :class:`chatcore.kv_cache.KVCache` (``tokens``, ``length``, ``capacity``,
``common_prefix``, ``truncate``, ``drop``, ``reset``, ``nbytes``), so the context manager's KV plans apply to
it unchanged.

:class:`SerialRunner` is the reference: each work is its own forward pass over an ordinary
:class:`~chatcore.kv_cache.KVCache` slot (correct for every model, tensor parallel included; nothing batched).
The paged runner (:mod:`chatcore.batch.paged_runner`) computes the same logits in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from chatcore.models.base import CausalModel


@dataclass(frozen=True)
class Work:
    """New tokens ``ids`` (at least one) of one sequence, after the ``slot.length`` tokens its slot holds."""

    slot: Any
    ids: Sequence[int]


class BatchRunner(Protocol):
    def new_slot(self, capacity: int) -> Any:
        """An empty slot for a sequence of at most ``capacity`` tokens (its memory taken as it grows)."""
        ...

    def run(self, works: Sequence[Work]) -> torch.Tensor:
        """One forward pass over every work (each slot at most once); returns float logits
        [len(works), vocab] of each work's last token, in order, and commits each work's ids to its slot."""
        ...

    def release(self, slot: Any) -> None:
        """The slot's sequence is gone: its memory can be reused (a prefix other sequences share stays)."""
        ...


class SerialRunner:
    """One forward pass per work, over ordinary KV cache slots: the reference the batched runner must equal."""

    def __init__(self, model: CausalModel) -> None:
        self.model = model

    def new_slot(self, capacity: int) -> Any:
        return self.model.new_slot(capacity)

    @torch.inference_mode()
    def run(self, works: Sequence[Work]) -> torch.Tensor:
        if len({id(w.slot) for w in works}) != len(works):
            raise ValueError("a batch holds each slot at most once")
        rows = []
        device = self.model.runtime.device
        for w in works:
            if not len(w.ids):
                raise ValueError("a work needs at least one new token")
            ids = torch.tensor(list(w.ids), dtype=torch.long, device=device)
            rows.append(self.model.forward(ids, w.slot)[-1].float())
            w.slot.commit(w.ids)
        return torch.stack(rows)

    def release(self, slot: Any) -> None:
        slot.reset()
