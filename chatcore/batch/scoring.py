"""The logits of every token, on a batch engine's slots: what :meth:`Engine.prefill(all_logits=True)`,
:meth:`Engine.score` and :meth:`Engine.logits` compute, for the paged runner's slots as for KV caches.

Run in the scheduler's step thread, with the model to itself (the BatchEngine hands them over as calls).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from chatcore.batch.paged import PagedSlot
from chatcore.batch.step import BatchStep
from chatcore.engine import Engine
from chatcore.errors import PromptTooLong
from chatcore.generation import ScoreResult, score_result
from chatcore.kv_cache import KVCache
from chatcore.prefix import reused_prefix


@torch.inference_mode()
def prefill_all(engine: Engine, runner: Any, slot: Any, ids: Sequence[int], chunk: int,
                sink_tokens: int | None = None) -> torch.Tensor:
    """Append ``ids`` to the slot in chunks; logits [len(ids), vocab] (float32) of every one of them."""
    if isinstance(slot, KVCache):
        return engine.prefill(ids, slot, all_logits=True, sink_tokens=sink_tokens).float()
    if not isinstance(slot, PagedSlot):
        raise TypeError(f"no all-token prefill for a slot of type {type(slot).__name__}")
    if sink_tokens is None and slot.length + len(ids) > slot.capacity:
        raise PromptTooLong(f"the prompt needs {slot.length + len(ids)} tokens but the context window is "
                            f"{slot.capacity}; shorten it or raise the window")
    if sink_tokens is not None:
        chunk = min(chunk, Engine._shift_size(slot, sink_tokens))
    model, pool = runner.model, runner.pool
    outs = []
    for i in range(0, len(ids), chunk):
        piece = [int(t) for t in ids[i: i + chunk]]
        if sink_tokens is not None:
            engine.make_room(slot, len(piece), sink_tokens)
        with pool.pinned([slot]):
            slot.reserve(len(piece))
            step = BatchStep(pool, [slot], [len(piece)], model.backend)
            x = torch.tensor(piece, dtype=torch.long, device=model.runtime.device)
            outs.append(model.run(x, step, all_logits=True).float())
            slot.commit(piece)
    return torch.cat(outs)


def score(engine: Engine, runner: Any, slot: Any, ids: list[int], cont: list[int], chunk: int) -> ScoreResult:
    """:meth:`Engine.score` on the slot (checked ids): its matching prefix of ``ids`` reused; afterwards it holds
    ``ids`` and ``cont``."""
    full = ids + cont
    t0 = time.perf_counter()
    keep = reused_prefix(slot.tokens, ids)
    slot.truncate(keep)
    logits = prefill_all(engine, runner, slot, full[keep:], chunk)
    return score_result(logits, ids, cont, keep, time.perf_counter() - t0)
