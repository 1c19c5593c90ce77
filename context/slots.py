"""A pool of KV cache slots shared by resident sessions, bounded by memory, least recently used out.

A freed slot is simply forgotten; its session gets a fresh one on its next turn and rebuilds it from
its stored history (one full prefill). Works on any object with `nbytes()`, so it is testable with
plain fakes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class SlotPool:
    def __init__(self, factory: Callable[[int], Any], max_bytes: int | None = None) -> None:
        """`factory(capacity)` makes a slot (e.g. `engine.new_slot`); `max_bytes` None: no limit."""
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self.factory = factory
        self.max_bytes = max_bytes
        self._slots: OrderedDict[Hashable, Any] = OrderedDict()
        self.evictions = 0

    def get(self, key: Hashable, capacity: int) -> Any:
        """The slot of `key` (a new, empty one if it has none or it was freed); now the most recent."""
        slot = self._slots.get(key)
        if slot is None or slot.capacity != capacity:
            slot = self.factory(capacity)
            self._slots[key] = slot
        self._slots.move_to_end(key)
        return slot

    def holds(self, key: Hashable) -> bool:
        return key in self._slots

    def discard(self, key: Hashable) -> None:
        self._slots.pop(key, None)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self._slots.values())

    def resident(self) -> list[Hashable]:
        """Keys of resident slots, least recently used first."""
        return list(self._slots)

    def trim(self, keep: Hashable | None = None) -> list[Hashable]:
        """Free least recently used slots (never `keep`) until the pool fits `max_bytes`."""
        freed: list[Hashable] = []
        if self.max_bytes is None:
            return freed
        total = self.nbytes()
        for key in list(self._slots):
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            total -= self._slots.pop(key).nbytes()
            freed.append(key)
            self.evictions += 1
        return freed
