"""The model writes a summary of pruned turns (the summary region), with its cost measured."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .budget import TokenBudget


@dataclass(frozen=True)
class SummaryResult:
    """A summary and what it cost: prompt tokens prefilled, tokens generated, wall time."""

    text: str
    turns: int  # history turns it covers, from the first
    prompt_tokens: int
    generated_tokens: int
    seconds: float


def transcript(messages: Sequence[Any]) -> str:
    return "\n".join(f"{m.role.capitalize()}: {m.content}" for m in messages)


def summary_prompt(budget: TokenBudget, instruction: str, previous: str | None, messages: Sequence[Any],
                   max_prompt: int) -> list[int]:
    """The summarization prompt, keeping the most recent part of the transcript if it is too long."""
    body = transcript(messages)
    if previous:
        body = f"Earlier summary: {previous}\n\n{body}"
    msgs = [{"role": "system", "content": instruction}, {"role": "user", "content": body}]
    ids = budget.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    tokens = budget.tokenizer.encode(body)
    keep = len(tokens)
    while len(ids) > max_prompt and keep > 1:
        keep = max(1, keep - (len(ids) - max_prompt))
        msgs[1]["content"] = "..." + budget.tokenizer.decode(tokens[-keep:])
        ids = budget.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    return ids


def summarize(engine: Any, budget: TokenBudget, instruction: str, previous: str | None, messages: Sequence[Any],
              turns: int, max_tokens: int, window: int) -> SummaryResult:
    """Run the model greedily on the summary prompt in a scratch slot; returns the text and its cost."""
    from chatcore.sampling import SamplingParams

    t0 = time.perf_counter()
    ids = summary_prompt(budget, instruction, previous, messages, max(16, window - max_tokens))
    slot = engine.new_slot(window)
    parts: list[str] = []
    generated = 0
    for ev in engine.generate(ids, SamplingParams(max_new_tokens=max_tokens, temperature=0.0), slot=slot):
        parts.append(ev.text)
        if ev.stats is not None:
            generated = ev.stats.generated_tokens
    return SummaryResult("".join(parts).strip(), turns, len(ids), generated, time.perf_counter() - t0)


def summarize_pruned(engine: Any, manager: Any, plan: Any) -> tuple[SummaryResult, Any]:
    """The summary extended over the turns `plan` prunes (a ContextManager's plan): the model writes it from
    the earlier summary and the turns it does not cover yet. Returns it and the last message it covers."""
    m, cfg = manager, manager.config
    done = m.summary.turns if m.summary is not None else 0
    first, last = m.index.turns[done].start, m.index.turns[plan.cut - 1].end
    result = summarize(engine, m.budget, cfg.summary_prompt, m.summary.text if m.summary is not None else None,
                       m.thread[first:last], plan.cut, cfg.summary_max_tokens, m.window)
    return result, m.thread[last - 1]
