"""The turn report: what the model saw this turn and what it cost."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TurnReport:
    """One turn, explained.

    window: tokens the model may see. tokens_used: prompt tokens this turn (the sum of
    tokens_by_region: system, pinned, summary, history, new; `new` includes the template's
    generation prompt). turns_kept / turns_dropped: earlier turns in / out of context;
    turns_summarized: dropped turns the summary covers. cache_hit_tokens: prompt tokens the KV slot
    already held; prefill_tokens: prompt tokens computed. ttft_s: time to first token; decode_tok_s:
    decode speed (0.0 when fewer than two tokens were generated). unsaved: messages of the session
    kept in memory when the turn ended because Redis was unreachable (this turn's and earlier ones); the
    session writes them in the background once Redis answers (`ChatSession.on_save` says when).
    """

    window: int
    tokens_used: int
    tokens_by_region: dict[str, int] = field(default_factory=dict)
    turns_kept: int = 0
    turns_dropped: int = 0
    turns_summarized: int = 0
    cache_hit_tokens: int = 0
    prefill_tokens: int = 0
    ttft_s: float = 0.0
    decode_tok_s: float = 0.0
    unsaved: int = 0
