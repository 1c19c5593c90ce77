"""One turn, as sessions and replay run it: plan -> (summarize, re-plan) -> KV plan -> apply -> commit, then
generate (or score) -> the report.

    turn = begin_turn(manager, slot, engine)          # the slot now holds a prefix of turn.plan.ids
    gen = turn.generate(engine, params, slot)         # or turn.score(engine, slot, reply_ids)
    report = turn.report(gen.stats)                   # the engine's cache and timing figures

No torch here: the engine computes, and reports what it reused and what it cost; a turn passes that on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from chatcore.prefix import reused_prefix

from .manager import ContextManager
from .plan import KVPlan, Plan, SlotLike, plan_kv
from .report import TurnReport
from .summarize import SummaryResult, summarize_pruned


class EngineFigures(Protocol):
    """What the engine says about one call (GenerationStats, or ScoreResult for a scored reply)."""

    cached_tokens: int
    prefill_tokens: int
    ttft_s: float

    @property
    def decode_tokens_per_s(self) -> float: ...


@dataclass(frozen=True)
class Turn:
    """A planned turn whose slot is ready: the plan, the KV operations applied, the summary written for it."""

    plan: Plan
    kv: KVPlan
    summary: SummaryResult | None = None

    def max_new_tokens(self, wanted: int) -> int:
        """`wanted`, capped to what the window holds after the prompt (at least one token)."""
        return max(1, min(wanted, self.plan.window - len(self.plan.ids)))

    def generate(self, engine: Any, params: Any, slot: Any) -> Any:
        """The reply's stream (the engine's Generation), at most `max_new_tokens(params.max_new_tokens)` long."""
        params = params.replace(max_new_tokens=self.max_new_tokens(params.max_new_tokens))
        return engine.generate(self.plan.ids, params, slot=slot)

    def score(self, engine: Any, slot: Any, reply: Sequence[int]) -> Any:
        """Score a recorded reply after the prompt (as much of it as the slot holds): the engine's ScoreResult."""
        return engine.score(self.plan.ids, list(reply)[: max(0, slot.capacity - len(self.plan.ids))], slot=slot)

    def report(self, figures: EngineFigures | None = None) -> TurnReport:
        """What the model saw (the plan) and what it cost (the engine's `figures`). Without figures (no model
        ran, as in plan-only replay; or a wrapper kept them back): the tokens the engine would reuse, untimed."""
        plan = self.plan
        if figures is None:
            hit, prefill, ttft, tok_s = self.planned_hit(), None, 0.0, 0.0
        else:
            hit, prefill, ttft, tok_s = (figures.cached_tokens, figures.prefill_tokens, figures.ttft_s,
                                         figures.decode_tokens_per_s)
        return TurnReport(window=plan.window, tokens_used=plan.tokens, tokens_by_region=dict(plan.tokens_by_region),
                          turns_kept=plan.turns_kept, turns_dropped=plan.turns_dropped,
                          turns_summarized=min(plan.summary_turns, plan.turns_dropped), cache_hit_tokens=hit,
                          prefill_tokens=plan.tokens - hit if prefill is None else prefill, ttft_s=ttft,
                          decode_tok_s=tok_s)

    def planned_hit(self) -> int:
        """Prompt tokens the engine reuses from the slot as the KV plan left it (the engine's own rule)."""
        return reused_prefix(self.plan.ids[: self.kv.reused], self.plan.ids)


def begin_turn(manager: ContextManager, slot: SlotLike, engine: Any = None, *,
               on_summary: Callable[[SummaryResult, Any], None] | None = None) -> Turn:
    """Plan the reply to the manager's last turn and make the slot's tokens a prefix of the prompt.

    When the policy summarizes and the plan prunes turns the summary does not cover, the model (`engine`)
    extends the summary first and the turn is planned again with it; `on_summary(result, last_message)` sees
    it before the manager adopts it (a session stores it). The plan is committed (the next turn's hysteresis
    starts from it).
    """
    m, cfg = manager, manager.config
    plan = m.plan()
    summary = None
    if cfg.summarize and plan.cut > (m.summary.turns if m.summary is not None else 0):
        summary, last = summarize_pruned(engine, m, plan)
        if on_summary is not None:
            on_summary(summary, last)
        m.set_summary(summary.text, turns=plan.cut)
        plan = m.plan()
    prev = m.last
    bounds = [*prev.starts, len(prev.ids)] if prev is not None else []
    kv = plan_kv(slot.tokens, plan.ids, cfg.kv_mode, bounds, cfg.shift_min_tokens)
    kv.apply(slot)
    m.commit(plan)
    return Turn(plan, kv, summary)
