"""The batched runner: every work of a step in one forward pass over paged KV memory.

:class:`PagedRunner` implements :class:`~chatcore.batch.runner.BatchRunner` on a
:class:`~chatcore.batch.paged.PagedPool`: ``new_slot`` gives a :class:`~chatcore.batch.paged.PagedSlot`,
``run`` takes decode tokens and prompt chunks of any lengths in one :class:`~chatcore.batch.step.BatchStep`
forward and returns each work's last logits (equal to :class:`~chatcore.batch.runner.SerialRunner`'s, to float
rounding), ``release`` gives a sequence's blocks back (registered prefixes stay matchable until memory is
needed). A work on a slot ending at a block boundary first shares the registered blocks of its ids, if any
(e.g. a system prompt another conversation has run): those tokens are not computed again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chatcore.batch.graphs import decode_graphs
from chatcore.batch.paged import PagedPool, PagedSlot
from chatcore.batch.runner import Work
from chatcore.batch.step import BatchStep
from chatcore.models.base import CausalLM


class PagedRunner:
    """Batched forward passes of a whole model in one process (a :class:`CausalLM`) over ``pool``."""

    def __init__(self, model: CausalLM, pool: PagedPool) -> None:
        if not isinstance(model, CausalLM):
            raise TypeError("the paged runner needs a model in one process (tensor parallel: SerialRunner)")
        self.model, self.pool = model, pool
        self.shared_tokens = 0   # tokens works took from shared blocks instead of computing them
        self.graphs = decode_graphs(model, pool)   # decode-only batches on CUDA: CUDA graphs per batch bucket

    def new_slot(self, capacity: int) -> PagedSlot:
        return self.pool.new_slot(min(capacity, self.model.runtime.max_seq_len))

    @torch.inference_mode()
    def run(self, works: Sequence[Work]) -> torch.Tensor:
        if not works:
            raise ValueError("a batch needs at least one work")
        if len({id(w.slot) for w in works}) != len(works):
            raise ValueError("a batch holds each slot at most once")
        slots: list[PagedSlot] = []
        for w in works:
            if not len(w.ids):
                raise ValueError("a work needs at least one new token")
            if not isinstance(w.slot, PagedSlot) or w.slot.pool is not self.pool:
                raise ValueError("a work's slot must come from this runner's new_slot")
            slots.append(w.slot)
        with self.pool.pinned(slots):
            rest: list[list[int]] = []
            for w in works:
                ids = [int(i) for i in w.ids]
                k = w.slot.share_prefix(ids)
                self.shared_tokens += k
                ids = ids[k:]
                w.slot.reserve(len(ids))
                rest.append(ids)
            if self.graphs is not None and all(len(r) == 1 for r in rest) and self.graphs.takes(len(rest)):
                logits = self.graphs.run(slots, [r[0] for r in rest]).float()
            else:
                step = BatchStep(self.pool, slots, [len(r) for r in rest], self.model.backend)
                x = torch.tensor([i for r in rest for i in r], dtype=torch.long, device=self.model.runtime.device)
                logits = self.model.run(x, step).float()
            for slot, ids in zip(slots, rest, strict=True):
                slot.commit(ids)
        return logits

    @torch.inference_mode()
    def greedy_step(self, slots: Sequence[PagedSlot], tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """A decode step of one token per slot (each reserved for it), ``tokens`` from the host or the device:
        each row's argmax, int64 [n] on the device, queued and not waited for (through the decode graphs where
        they take the batch, else one eager pass). Commits nothing (the caller commits each token once it knows
        it)."""
        if self.graphs is not None and self.graphs.takes(len(slots)):
            return self.graphs.run(slots, tokens, greedy=True)
        x = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(
            list(tokens), dtype=torch.long, device=self.model.runtime.device)
        step = BatchStep(self.pool, list(slots), [1] * len(slots), self.model.backend)
        return self.model.run(x, step).argmax(dim=-1)

    def release(self, slot: PagedSlot) -> None:
        slot.reset()
