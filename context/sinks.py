"""One stream longer than the window: a token sliding window with attention sinks (StreamingLLM).

The first `sinks` tokens stay; when the slot is full the oldest tokens after them are dropped and the
rest shifted back (the engine re-rotates RoPE keys; ALiBi needs none). Nothing is re-prefilled, memory
stays flat at the window, and so does the time per token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any


def stream_with_sinks(engine: Any, ids: Sequence[int], params: Any = None, *, sinks: int = 4,
                      window: int | None = None, slot: Any = None) -> Iterator[Any]:
    """Generate from `ids` (which may itself be longer than the window) for as long as `params`
    allows, keeping `sinks` attention-sink tokens. Yields the engine's TokenEvents."""
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    if slot is None:
        slot = engine.new_slot(window)
    return engine.generate(list(ids), params, slot=slot, sink_tokens=sinks)
