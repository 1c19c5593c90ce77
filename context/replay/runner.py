"""Replays a recorded conversation turn by turn through the context manager and the engine.

At every point where the recording has an assistant reply (and after a final user message), the
context manager plans the prompt; then, by mode:

- generate: the engine writes the reply (greedy by default; a seeded sample otherwise), and that reply
  — not the recorded one — goes into the history the next turns see;
- forced: the recorded reply is kept, so the context manager sees exactly the same history every run,
  and the model only scores it (mean negative log-likelihood per token, and how many of its tokens
  are the model's own greedy choice); a final user message with no recorded reply is answered by the
  model (so a test can ask a question after a fixed history);
- plan: forced, with no model run at all (only the tokenizer): plans and prompt hashes.

No storage: a ContextManager over plain messages and one KV slot per conversation, reused across turns
through the turn pipeline ChatSession runs (context/turn.py). Everything but the timing fields is a
function of the inputs, the model, the seed and the policy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatcore.errors import ChatcoreError

from ..budget import TokenBudget
from ..layout import ContextConfig
from ..manager import ContextManager
from ..plan import Plan
from ..turn import Turn, begin_turn
from .formats import RecordedConversation, ReplayMessage

MODES = ("generate", "forced", "plan")


def prompt_hash(ids: Sequence[int]) -> str:
    """sha256 of the prompt token ids, each packed as a little-endian uint32."""
    return hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).hexdigest()


@dataclass(frozen=True)
class TurnResult:
    """One replayed turn: what the model saw (the plan), what it said or how it scored, what it cost.

    `step` numbers the replayed replies of a conversation from 1 (a turn with a tool call has several);
    `turn` is the 1-based number of the user turn being answered; `kept`, `pinned`, `summarized` and
    `dropped` are numbers of earlier turns (a turn is a user message with what follows it). `pinned`:
    dropped turns whose pinned messages stay in the pinned region. `regions`: prompt tokens per region.
    `score` (forced mode with a model): {"tokens", "nll", "top1"}. Timing fields are not reproducible.
    """

    conversation: str
    line: int
    step: int
    turn: int
    mode: str
    user: str
    window: int
    budget: int
    tokens: int
    regions: dict[str, int]
    kept: tuple[int, ...]
    pinned: tuple[int, ...]
    summarized: tuple[int, ...]
    dropped: tuple[int, ...]
    pruned_now: int
    truncated: bool
    prompt_sha256: str
    cache_hit_tokens: int
    prefill_tokens: int
    reply: str | None = None
    reply_tokens: int = 0
    finish_reason: str | None = None
    score: dict[str, float] | None = None
    summary: str | None = None
    ttft_s: float = 0.0
    decode_tok_s: float = 0.0
    wall_s: float = 0.0
    plan: Plan | None = field(default=None, repr=False, compare=False)

    def in_context(self, turn: int) -> bool:
        """Whether (some of) earlier turn `turn` was in this turn's prompt, as history or pinned."""
        return turn in self.kept or turn in self.pinned

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
        """The messages the model saw, in prompt order (system, pinned, summary, history, new)."""
        return list(self.plan.messages) if self.plan is not None else []


@dataclass(frozen=True)
class ConversationResult:
    """A replayed conversation: its turns, and the error that stopped it (if any)."""

    conversation: str
    line: int
    turns: tuple[TurnResult, ...]
    error: str | None = None

    def turn(self, n: int) -> TurnResult:
        """Turn number `n` (1-based; negative counts from the end, -1 = the last)."""
        if n < 0:
            return self.turns[n]
        for t in self.turns:
            if t.turn == n:
                return t
        raise KeyError(f"conversation {self.conversation!r} has no replayed turn {n}")

    @property
    def replies(self) -> list[str | None]:
        return [t.reply for t in self.turns]


@dataclass(frozen=True)
class ReplayOptions:
    """How to replay: mode, context policy (a ContextConfig), reply length and sampling, seed."""

    mode: str = "generate"
    config: ContextConfig = ContextConfig()
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


class TokenSlot:
    """A KV slot's bookkeeping without tensors (plan mode): the token ids a model's slot would hold."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tokens: list[int] = []

    def truncate(self, n: int) -> None:
        del self.tokens[n:]

    def drop(self, start: int, end: int) -> None:
        del self.tokens[start:end]


class Replayer:
    """Replays conversations with one model (an Engine; or only a tokenizer in plan mode)."""

    def __init__(self, engine: Any | None, options: ReplayOptions, *, tokenizer: Any | None = None,
                 engine_window: int | None = None) -> None:
        if engine is None and options.mode != "plan":
            raise ValueError("generate and forced modes need an engine; plan mode needs only a tokenizer")
        if options.config.summarize and engine is None:
            raise ValueError("the summarize policy needs the model (it writes the summaries); drop plan-only")
        self.engine = engine
        self.options = options
        tok = tokenizer if tokenizer is not None else engine.require_tokenizer()
        self.budget = TokenBudget(tok)
        window = engine_window if engine_window is not None else (engine.window if engine is not None else None)
        if window is None:
            raise ValueError("give engine_window (the model's context length) when replaying without an engine")
        self.engine_window = window
        self._runs_model = engine is not None and options.mode != "plan"

    # -- conversations --------------------------------------------------------------------------------
    def replay(self, conv: RecordedConversation,
               on_turn: Callable[[TurnResult], None] | None = None) -> ConversationResult:
        """Replay one conversation. A chatcore error (a message that cannot fit, a chat template that refuses
        it) stops it, recorded; the other conversations still replay."""
        m = ContextManager(self.budget, self.engine_window, self.options.config)
        m.set_system(conv.system)
        m.pinned = tuple(msg.id for msg in conv.messages if msg.pinned)
        slot = self.engine.new_slot(m.window) if self._runs_model else TokenSlot(m.window)
        turns: list[TurnResult] = []
        msgs = conv.messages
        try:
            for i, msg in enumerate(msgs):
                reply_point = msg.role == "assistant" and i > 0 and msgs[i - 1].role != "assistant"
                if not reply_point:
                    m.append(msg)
                    continue
                recorded = self.options.mode != "generate" or "tool_calls" in msg.extra
                result, text = self._turn(conv, m, slot, msg if recorded else None, len(turns) + 1)
                turns.append(result)
                if on_turn is not None:
                    on_turn(result)
                m.append(msg if recorded else dataclasses.replace(msg, content=text))
            if msgs and msgs[-1].role != "assistant":
                result, _ = self._turn(conv, m, slot, None, len(turns) + 1)
                turns.append(result)
                if on_turn is not None:
                    on_turn(result)
        except ChatcoreError as exc:  # a message that cannot fit, a template that refuses the conversation
            return ConversationResult(conv.id, conv.line, tuple(turns), f"turn {len(turns) + 1}: {exc}")
        return ConversationResult(conv.id, conv.line, tuple(turns))

    def replay_all(self, convs: Sequence[RecordedConversation],
                   on_turn: Callable[[TurnResult], None] | None = None) -> list[ConversationResult]:
        return [self.replay(c, on_turn) for c in convs]

    # -- one turn -------------------------------------------------------------------------------------
    def _turn(self, conv: RecordedConversation, m: ContextManager, slot: Any, recorded: ReplayMessage | None,
              step: int) -> tuple[TurnResult, str]:
        t0 = time.perf_counter()
        turn = begin_turn(m, slot, self.engine)
        fields: dict[str, Any] = {}
        text = ""
        if recorded is None and self._runs_model:  # generate mode, or a final user message in forced mode
            mode = "generate"
            figures, text, finish = self._generate(turn, slot, len(m.index))
            fields = {"reply": text, "finish_reason": finish,
                      "reply_tokens": figures.generated_tokens if figures is not None else 0}
        elif recorded is not None and self._runs_model:
            mode = "forced"  # in generate mode too: a recorded tool call is kept as recorded
            figures = turn.score(self.engine, slot, self._reply_ids(recorded))
            fields = {"reply_tokens": figures.tokens}
            if figures.tokens:
                fields["score"] = {"tokens": figures.tokens, "nll": round(figures.nll, 4),
                                   "top1": round(figures.top1, 4)}
        else:
            mode = self.options.mode  # plan mode: no model run
            figures = None
        report = turn.report(figures)
        if not self._runs_model:  # what a model's slot would hold after this turn
            slot.tokens = list(turn.plan.ids) + (self._reply_ids(recorded) if recorded is not None else [])
        fields.update(cache_hit_tokens=report.cache_hit_tokens, prefill_tokens=report.prefill_tokens)
        if figures is not None:
            fields.update(ttft_s=report.ttft_s, decode_tok_s=report.decode_tok_s)
        summary = turn.summary.text if turn.summary is not None else None
        return self._result(conv, m, turn.plan, mode, summary, time.perf_counter() - t0, fields, step), text

    def _result(self, conv: RecordedConversation, m: ContextManager, plan: Plan, mode: str, summary: str | None,
                wall: float, fields: dict[str, Any], step: int) -> TurnResult:
        end, cut = plan.history_turns, plan.cut
        first_new = next((mid for mid, start in zip(plan.message_ids, plan.starts, strict=True)
                          if mid is not None and plan.regions["new"][0] <= start < plan.regions["new"][1]), None)
        user = next((d["content"] for d, start in zip(plan.messages, plan.starts, strict=True)
                     if d["role"] == "user" and plan.regions["new"][0] <= start < plan.regions["new"][1]), "")
        turn = (m.index.turn_of[m.position(first_new)] + 1) if first_new is not None else end + 1
        p0, p1 = plan.regions["pinned"]
        pinned = sorted({m.index.turn_of[m.position(mid)] + 1 for mid, start in zip(plan.message_ids, plan.starts,
                                                                                     strict=True)
                         if mid is not None and p0 <= start < p1})
        return TurnResult(
            conversation=conv.id, line=conv.line, step=step, turn=turn, mode=mode, user=user, window=plan.window,
            budget=plan.budget, tokens=plan.tokens, regions=dict(plan.tokens_by_region),
            kept=tuple(range(cut + 1, end + 1)), pinned=tuple(pinned),
            summarized=tuple(range(1, min(plan.summary_turns, cut) + 1)), dropped=tuple(range(1, cut + 1)),
            pruned_now=plan.pruned_now, truncated=bool(plan.truncated), prompt_sha256=prompt_hash(plan.ids),
            summary=summary, wall_s=wall, plan=plan, **fields)

    def _generate(self, turn: Turn, slot: Any, n: int) -> tuple[Any, str, str | None]:
        """The model's reply to turn `n` (greedy, or sampled with a seed per turn): its stats, text, finish."""
        from chatcore.sampling import SamplingParams

        opts = self.options
        params = SamplingParams(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                                seed=opts.seed * 1_000_003 + n)
        gen = turn.generate(self.engine, params, slot)
        parts: list[str] = []
        finish = None
        for ev in gen:
            parts.append(ev.text)
            finish = ev.finish_reason
        return gen.stats, "".join(parts), finish

    def _reply_ids(self, msg: ReplayMessage) -> list[int]:
        """The recorded reply's tokens as the template renders them after the generation prompt."""
        d: dict[str, Any] = {"role": msg.role, "content": msg.content, **msg.extra}
        seg = self.budget.segment(d)
        gp = self.budget.generation_prompt
        if gp and seg[: len(gp)] == gp:
            return list(seg[len(gp):])
        return list(self.budget.tokenizer.encode(msg.content))
