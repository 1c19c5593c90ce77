"""The replay fixture as users write tests with it: a fact from turn 1 still there at the last turn."""

from __future__ import annotations

from typing import Any

import pytest

FILLER = [("What is the capital of Italy?", "Rome."), ("Name a large ocean.", "The Pacific Ocean."),
          ("How many legs does a spider have?", "Eight."), ("Give me a synonym for happy.", "Joyful."),
          ("What is 2 plus 2?", "4."), ("What color is the sky?", "Blue."), ("What do bees make?", "Honey.")]


def conversation(filler: list[tuple[str, str]], question: str | None = "What is my name?") -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are a helpful assistant."},
                                  {"role": "user", "content": "My name is Alice.", "pinned": True},
                                  {"role": "assistant", "content": "Nice to meet you, Alice!"}]
    for q, a in filler:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if question:
        msgs.append({"role": "user", "content": question})
    return msgs


def test_fact_from_turn_1_stays_in_a_2k_window_at_turn_30(replay: Any) -> None:
    """Plan level, no weights: 30 turns of about 90 tokens overflow a 2,048-token window; the pinned
    fact of turn 1 is still in the prompt at turn 30 while turns around it were pruned."""
    long = [(f"Tell me about topic number {i}: {q} Please answer in detail, with examples and history.",
             f"Topic {i}: {a} " + "Here are further details and some history on it. " * 2) for i, (q, a) in
            enumerate(FILLER * 5, 2)][:28]
    run = replay(conversation(long), mode="plan", window=2048, max_new_tokens=64)
    last = run.conversation().turn(30)
    assert last.dropped and 2 in last.dropped and last.tokens <= last.budget == 2048 - 64
    assert last.in_context(1) and last.pinned == (1,)
    assert "My name is Alice." in [m["content"] for m in last.prompt_messages]


@pytest.mark.slow
def test_fact_from_turn_1_answered_after_its_turn_was_pruned(replay: Any) -> None:
    """With the model: recorded history (forced), then the model answers the final question. The
    135M demo model retrieves the fact when the pinned message sits just before the question."""
    run = replay(conversation(FILLER), mode="forced", window=192, max_new_tokens=12,
                 policy={"layout": "pinned-last"})
    last = run.conversation().turn(-1)
    assert last.turn == 9 and last.mode == "generate"
    assert last.dropped[:1] == (1,) and last.pinned == (1,)  # turn 1 pruned, its pinned message kept
    assert "alice" in (last.reply or "").lower(), last.reply
    assert all(t.score is not None for t in run.turns[:-1])
