"""The session API over a tensor-parallel engine (CPU, gloo, 2 ranks) works unchanged: the same replies and
the same cache reuse as over the one-process engine, through prunings that shift the cache (``slot.drop`` on
every rank) and the sessions' slot pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from _context_helpers import drain

import chatcore
from context import ChatSession, ContextConfig


def _conversation(engine: Any, store: Any) -> tuple[list[tuple[str, int, int, int]], torch.Tensor]:
    """Seven turns; then logits of three more tokens over the session's slot (whose keys were shifted)."""
    cfg = ContextConfig(window=300, reply_reserve=40, kv_mode="shift")
    s = ChatSession.create(engine, store, system="Be short.", config=cfg, max_new_tokens=6, temperature=0.0)
    turns = []
    for i in range(7):
        ev = drain(s.send(f"turn {i} " + "z" * 36))
        r = ev.report
        turns.append((s.messages()[-1].content, r.cache_hit_tokens, r.prefill_tokens, r.turns_dropped))
    return turns, engine.prefill([40, 41, 42], s.pool.get(s.id, s.window), all_logits=True).float()


def test_session_over_two_ranks_matches_one_process(chat_model_dir: Path, chat_engine: Any, store: Any) -> None:
    expected, logits = _conversation(chat_engine, store)
    assert any(dropped and hit > 60 for _, hit, _, dropped in expected), "no turn shifted the cache"
    with chatcore.load(chat_model_dir, device="cpu", dtype="float32", max_seq_len=512, tensor_parallel=2) as tp:
        turns, tp_logits = _conversation(tp, store)
    assert turns == expected
    torch.testing.assert_close(tp_logits, logits, rtol=0, atol=1e-4)
