"""A turn's plan: the exact token sequence, where each region lies, and what to do to the KV slot.

The KV side is stated as verbs on a slot (`truncate`, `drop`), applied by `KVPlan.apply`; the engine's
`generate` then prefills only what the slot does not already hold. No tensors here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from chatcore.prefix import common_prefix


class SlotLike(Protocol):
    tokens: list[int]

    def truncate(self, n: int) -> None: ...

    def drop(self, start: int, end: int) -> None: ...


@dataclass(frozen=True)
class Plan:
    """What the model sees this turn.

    ids: the prompt (the chat template applied to `messages`, with the generation prompt).
    messages: the kept messages as the template sees them, in prompt order.
    message_ids: the stored id of each of `messages` (None for the system prompt and the summary).
    starts: token offset where each of `messages` begins in `ids`.
    regions: region name -> (start, end) token span; tokens_by_region: region -> token count.
    cut: first kept history turn; history_turns: turns before the new one; summary_turns: turns the
    summary covers; pruned_now: turns this plan prunes that the previous one kept.
    """

    ids: list[int]
    messages: list[dict[str, Any]]
    message_ids: list[str | None]
    starts: list[int]
    regions: dict[str, tuple[int, int]]
    tokens_by_region: dict[str, int]
    window: int
    budget: int
    cut: int
    history_turns: int
    summary_turns: int
    pruned_now: int = 0
    truncated: tuple[str | None, ...] = field(default=())

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @property
    def turns_kept(self) -> int:
        return self.history_turns - self.cut

    @property
    def turns_dropped(self) -> int:
        return self.cut

    def in_context(self) -> set[str]:
        return {m for m in self.message_ids if m is not None}


@dataclass(frozen=True)
class KVPlan:
    """Operations on a cache slot that make its tokens a prefix of the plan's ids.

    keep: slot tokens kept in place (the common prefix). drop: span of slot tokens removed and shifted
    over (shift mode), None in exact mode. reused: tokens the slot holds afterwards (all a prefix of
    the ids). prefill: tokens left to compute.
    """

    mode: str
    keep: int
    drop: tuple[int, int] | None
    reused: int
    prefill: int

    def apply(self, slot: SlotLike) -> None:
        if self.drop is None:
            slot.truncate(min(self.keep, len(slot.tokens)))
            return
        start, end = self.drop
        slot.truncate(self.reused + (end - start))
        slot.drop(start, end)


def plan_kv(slot_tokens: Sequence[int], ids: Sequence[int], mode: str = "exact",
            boundaries: Sequence[int] = (), min_shift: int = 16) -> KVPlan:
    """How to reuse a slot holding `slot_tokens` for a prompt `ids`.

    exact: keep the common prefix, prefill the rest (what a fresh prefill would compute, bit for bit).
    shift: also look for a later message of the slot (at its `boundaries`) whose tokens reappear in
    `ids` from the last boundary at or before the common prefix's end (the turns after a pruned span);
    drop the span between so they move back (RoPE keys re-rotated by the slot), when that reuses at
    least `min_shift` more tokens than exact mode. Approximate. The search starts at a boundary because a
    common prefix usually runs into the next message's header (e.g. ChatML's "<|im_start|>user\n"),
    which the first kept message and the first pruned one share.
    """
    slot_tokens = list(slot_tokens)
    ids = list(ids)
    keep = common_prefix(slot_tokens, ids)
    best: tuple[int, int, int] | None = None   # (start, end of the dropped span, tokens reused after it)
    if mode == "shift" and keep < len(ids):
        start = max((b for b in boundaries if b <= keep), default=keep)
        for b in sorted(set(boundaries)):
            if b <= start:
                continue
            run = common_prefix(slot_tokens[b:], ids[start:])
            if start + run >= keep + min_shift and (best is None or run > best[2]):
                best = (start, b, run)
    if best is None:
        return KVPlan("exact" if mode == "exact" else "shift", keep, None, keep, len(ids) - keep)
    start, b, run = best
    return KVPlan("shift", start, (start, b), start + run, len(ids) - start - run)
