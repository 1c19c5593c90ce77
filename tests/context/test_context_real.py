"""Real weights: a fact in a pinned message is still answered after its turn was pruned."""

from __future__ import annotations

from typing import Any

import pytest
from _context_helpers import drain

from context import ChatSession, ContextConfig, Layout
from storage import Store


@pytest.mark.slow
def test_pinned_fact_answered_after_its_turn_was_pruned(demo_engine: Any, store: Store) -> None:
    # SmolLM2-135M recalls a fact reliably only when it sits near the question, so this test uses the
    # "restate pinned facts before the new message" layout (with the default layout the pinned message
    # is in context too, but this small model does not retrieve it across the distracting turns).
    cfg = ContextConfig(window=256, reply_reserve=48, layout=Layout(("system", "summary", "history", "pinned", "new")))
    s = ChatSession.create(demo_engine, store, system="You are a helpful assistant.", config=cfg,
                           max_new_tokens=24, temperature=0.0)
    for _ in s.send("My name is Alice."):
        pass
    s.pin(s.messages()[0].id)
    for q in ["What is the capital of Italy?", "Name a large ocean.", "How many legs does a spider have?",
              "Give me a synonym for happy.", "What is 2 plus 2?"]:
        ev = drain(s.send(q))
        assert ev.report.cache_hit_tokens > 0
    text = ""
    for ev in s.send("What is my name?"):
        text += ev.text
    report = ev.report
    msgs = s.messages()
    assert report.turns_dropped >= 1 and report.tokens_by_region["pinned"] > 0
    assert msgs[0].in_context and msgs[0].pinned and not msgs[1].in_context  # the fact's turn was pruned
    assert report.tokens_used <= 256 - 48
    assert "alice" in text.lower(), text
