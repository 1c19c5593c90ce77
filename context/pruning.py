"""Whole turns as the unit of pruning, with hysteresis watermarks. Plain ints, no model.

A turn starts at a user message and runs to the next one (the reply, tool calls and their results
belong to it), so kept history never starts with an orphan reply and never splits a pair. Messages
before the first user message form a turn of their own.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Collection
from dataclasses import dataclass


@dataclass
class Turn:
    start: int  # index of its first message in the thread
    end: int  # one past its last message
    tokens: int  # template tokens of all its messages
    pinned_tokens: int  # of which in pinned messages (never evicted)


class TurnIndex:
    """Turns of a thread with prefix sums of their evictable tokens, kept up to date incrementally."""

    def __init__(self) -> None:
        self.turns: list[Turn] = []
        self.turn_of: list[int] = []  # message index -> turn index
        self.counts: list[int] = []  # message index -> tokens
        self._prefix: list[int] = [0]  # _prefix[t] = evictable tokens of turns [0, t)

    def __len__(self) -> int:
        return len(self.turns)

    def append(self, role: str, tokens: int, pinned: bool = False) -> None:
        i = len(self.counts)
        if role == "user" or not self.turns:
            self.turns.append(Turn(i, i, 0, 0))
            self._prefix.append(self._prefix[-1])
        t = self.turns[-1]
        t.end = i + 1
        t.tokens += tokens
        if pinned:
            t.pinned_tokens += tokens
        else:
            self._prefix[-1] += tokens
        self.turn_of.append(len(self.turns) - 1)
        self.counts.append(tokens)

    def rebuild(self, roles: list[str], counts: list[int], pinned: Collection[int]) -> None:
        self.__init__()  # type: ignore[misc]
        for i, (role, n) in enumerate(zip(roles, counts, strict=True)):
            self.append(role, n, i in pinned)

    def truncate(self, n_messages: int, roles: list[str], pinned: Collection[int]) -> None:
        """Forget messages from index `n_messages` on (an edit or regenerate starts a new branch)."""
        self.rebuild(roles[:n_messages], self.counts[:n_messages], pinned)

    def evictable(self, a: int, b: int) -> int:
        """Tokens of turns [a, b) that pruning can free (pinned messages excluded)."""
        return self._prefix[b] - self._prefix[a]

    def choose_cut(self, prev: int, end: int, fixed: int, high: int, low: int, floor: int = 0) -> int:
        """First kept turn among history turns [0, end), given the previous one.

        Keeps `prev` while fixed + history stays at or under `high`; otherwise moves forward to the
        first turn where it is at or under `low` (or `end`: no history at all). Never before `floor`
        (turns a summary already covers)."""
        cut = min(max(prev, floor, 0), end)
        if fixed + self.evictable(cut, end) <= high:
            return cut
        need = self._prefix[end] - (low - fixed)  # smallest c with _prefix[c] >= need
        return min(end, max(cut, bisect_left(self._prefix, need, cut, end + 1)))
