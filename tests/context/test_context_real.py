"""Real weights and tokenizer (the demo model): a pinned message stays in the prompt, right before the new
message, after its turn was pruned; every turn reuses the KV slot as far as the previous turn's tokens match;
and the reused slot gives the logits of a fresh prefill. Nothing here depends on what the model knows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from _context_helpers import drain, reuse_matches_fresh_prefill

from context import ChatSession, ContextConfig, Layout
from storage import Store

QUESTIONS = ["What is the capital of Italy?", "Name a large ocean.", "How many legs does a spider have?",
             "Give me a synonym for happy.", "What is 2 plus 2?", "What is my name?"]


def shared(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.mark.slow
def test_pinned_message_stays_in_context_after_its_turn_was_pruned(demo_engine: Any, store: Store) -> None:
    # "restate pinned facts before the new message": the layout that changes most of the prompt each turn
    cfg = ContextConfig(window=256, reply_reserve=48, layout=Layout(("system", "summary", "history", "pinned", "new")))
    s = ChatSession.create(demo_engine, store, system="You are a helpful assistant.", config=cfg,
                           max_new_tokens=24, temperature=0.0)
    drain(s.send("My name is Alice."))
    fact = s.messages()[0]
    s.pin(fact.id)
    slot = s.pool.get(s.id, s.window)
    for q in QUESTIONS:
        held = list(slot.tokens)   # the last prompt and its reply
        r = drain(s.send(q)).report
        plan = s.manager.last
        assert r.tokens_used == len(plan.ids) == sum(r.tokens_by_region.values()) <= 256 - 48
        # exact mode: the slot's common prefix with the new prompt is reused, never the whole prompt
        assert r.cache_hit_tokens == min(shared(held, plan.ids), len(plan.ids) - 1) > 0
        assert r.prefill_tokens == r.tokens_used - r.cache_hit_tokens
        assert slot.tokens[: len(plan.ids)] == plan.ids and len(slot.tokens) > len(plan.ids)
        assert fact.id in plan.message_ids   # in the history while its turn is kept, then in the pinned region
        a, b = plan.regions["pinned"]
        if plan.cut > 0:
            assert b == plan.regions["new"][0] and "My name is Alice." in demo_engine.tokenizer.decode(plan.ids[a:b])
    msgs = s.messages()
    assert r.turns_dropped >= 1 and r.tokens_by_region["pinned"] > 0
    assert msgs[0].in_context and msgs[0].pinned and not msgs[1].in_context   # the fact's turn was pruned
    assert plan.message_ids.count(fact.id) == 1 and msgs[1].id not in plan.message_ids
    assert reuse_matches_fresh_prefill(demo_engine, s, "And what is my name now?") > 0
