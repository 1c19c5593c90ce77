"""Greedy decode steps launched ahead: step k+1 goes to the device before step k's tokens are read on the host.

When every running sequence decodes a plain greedy reply, the next step's tokens are the argmax of this step's
logits, which the device already holds. The scheduler then queues step k+1 with those tokens fed on the device
(:meth:`PagedRunner.greedy_step <chatcore.batch.paged_runner.PagedRunner.greedy_step>`), and only then reads
step k's tokens (a copy into pinned memory behind step k, waited for alone) and does its host work for them
(events, the detokenizer, stop strings) while step k+1 runs. The device no longer idles through that work.

A sequence that ends on a token read this way (an end token, a stop string, its limit) was already fed once
more in the step queued ahead: that row's work is thrown away, its token never committed to the slot, so the
slot holds what the step-by-step loop would have left. Whatever changes the batch (a new sequence, a cancel, a
call between steps, KV memory running out, a sampled reply) first waits for the step in flight and reads it
(:meth:`Scheduler._drain <chatcore.batch.scheduler.Scheduler._drain>`): the usual step follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class TokenFetch:
    """Copies token ids from the device into pinned host memory without holding the stream: two buffers used in
    turn (a fetch is read before the one after next starts), each copy followed by an event that
    :meth:`Fetched.tokens` waits on alone."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._bufs: list[torch.Tensor] = []
        self._turn = 0

    def start(self, ids: torch.Tensor) -> Fetched:
        n = ids.numel()
        cuda = self.device.type == "cuda"
        if not self._bufs or self._bufs[0].numel() < n:
            self._bufs = [torch.empty(max(n, 64), dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        buf = self._bufs[self._turn][:n]
        self._turn ^= 1
        buf.copy_(ids, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return Fetched(buf, event)


class Fetched:
    """One fetch in flight."""

    def __init__(self, buf: torch.Tensor, event: Any) -> None:
        self._buf, self._event = buf, event

    def tokens(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
        return self._buf.tolist()


class InFlight:
    """A greedy step queued on the device: its sequences in row order, each row's argmax on the device (the
    tokens the next step feeds) and their fetch to the host."""

    def __init__(self, reqs: Sequence[Any], ids: torch.Tensor, fetched: Fetched) -> None:
        self.reqs, self.ids, self.fetched = list(reqs), ids, fetched

    def next_tokens(self, reqs: Sequence[Any]) -> torch.Tensor:
        """The device tokens of ``reqs`` (a subset of this step's sequences, in any order): a gather unless they
        are this step's rows as they are."""
        if len(reqs) == len(self.reqs) and all(a is b for a, b in zip(reqs, self.reqs, strict=True)):
            return self.ids
        row = {id(r): i for i, r in enumerate(self.reqs)}
        cuda = self.ids.device.type == "cuda"   # pinned: the copy queues behind the step instead of waiting on it
        index = torch.tensor([row[id(r)] for r in reqs], dtype=torch.long, pin_memory=cuda)
        index = index.to(self.ids.device, non_blocking=cuda)
        return self.ids.index_select(0, index)
