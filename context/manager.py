"""The context manager: per turn, the exact token sequence the model sees. Plain data, no model.

It holds the current thread (any objects with `id`, `role`, `content` and optionally `extra`), the
system prompt, pinned ids and the summary, and keeps per-message token counts and a turn index up
to date as messages arrive, so planning a turn costs the new tokens, not the history.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .budget import ChatTokenizer, TokenBudget
from .errors import ContextError, ContextOverflow, MessageTooLong
from .layout import ContextConfig
from .plan import Plan
from .pruning import TurnIndex

_EXTRA_KEYS = ("name", "tool_calls", "tool_call_id")


class MessageLike(Protocol):
    id: str
    role: str
    content: str


@dataclass(frozen=True)
class Pending:
    """A message not stored yet (planned before it is written, to refuse one that cannot fit)."""

    role: str
    content: str
    id: str | None = None


@dataclass(frozen=True)
class SummaryState:
    text: str
    turns: int  # the summary covers history turns [0, turns)


def as_template(m: Any) -> dict[str, Any]:
    """The dict the chat template sees for a stored message (OpenAI-style extras carried over)."""
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    extra = getattr(m, "extra", None)
    if extra:
        d.update({k: extra[k] for k in _EXTRA_KEYS if k in extra})
    return d


class ContextManager:
    def __init__(self, tokenizer: ChatTokenizer | TokenBudget, engine_window: int,
                 config: ContextConfig | None = None) -> None:
        self.config = config or ContextConfig()
        self.budget = tokenizer if isinstance(tokenizer, TokenBudget) else TokenBudget(tokenizer)
        self.window, self.prompt_budget = self.config.budget(engine_window)
        self.system: str | None = None
        self.thread: list[Any] = []
        self._dicts: list[dict[str, Any]] = []
        self._pos: dict[str, int] = {}
        self.index = TurnIndex()
        self.pinned: tuple[str, ...] = ()
        self.summary: SummaryState | None = None
        self.cut = 0
        self.last: Plan | None = None
        self._planned = 0

    # -- state --------------------------------------------------------------------------------------
    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def set_budget(self, budget: TokenBudget) -> None:
        """Count through another budget from now on (the same tokenizer with other template extras, such as
        tools); the thread's counts are measured again."""
        self.budget = budget
        self.reset(list(self.thread))

    def reset(self, messages: Iterable[Any]) -> None:
        self.thread, self._dicts, self._pos = [], [], {}
        self.index = TurnIndex()
        for m in messages:
            self.append(m)

    def append(self, m: Any) -> None:
        d = as_template(m)
        self._pos[m.id] = len(self.thread)
        self.thread.append(m)
        self._dicts.append(d)
        self.index.append(m.role, self.budget.count(d), m.id in self.pinned)

    def truncate(self, n_messages: int) -> None:
        """Keep the first `n_messages` of the thread (a new branch starts after them)."""
        if n_messages >= len(self.thread):
            return
        mid_turn = n_messages > 0 and self.index.turn_of[n_messages] == self.index.turn_of[n_messages - 1]
        for m in self.thread[n_messages:]:
            self._pos.pop(m.id, None)
        del self.thread[n_messages:], self._dicts[n_messages:]
        self._planned = min(self._planned, n_messages)  # what is appended from here on is new, not pruned
        self.index.truncate(n_messages, [m.role for m in self.thread], self._pinned_positions())
        complete = len(self.index) - (1 if mid_turn else 0)
        if self.summary is not None and self.summary.turns > complete:
            self.summary = None  # the edit reaches into what the summary covers

    def position(self, message_id: str) -> int:
        try:
            return self._pos[message_id]
        except KeyError:
            raise ContextError(f"message {message_id!r} is not on the current branch") from None

    def set_pinned(self, ids: Sequence[str]) -> None:
        self.pinned = tuple(ids)
        self.index.rebuild([m.role for m in self.thread], list(self.index.counts), self._pinned_positions())

    def _pinned_positions(self) -> set[int]:
        return {self._pos[p] for p in self.pinned if p in self._pos}

    def set_summary(self, text: str | None, last_id: str | None = None, turns: int | None = None) -> None:
        """Set the summary covering the thread up to message `last_id` (or the first `turns` turns)."""
        if text is None:
            self.summary = None
            return
        if turns is None:
            if last_id not in self._pos:
                self.summary = None  # it covers another branch
                return
            turns = self.index.turn_of[self._pos[last_id]] + 1
        self.summary = SummaryState(text, turns)
        self.cut = max(self.cut, turns)

    def commit(self, plan: Plan) -> None:
        """Adopt `plan`'s cut as the state the next plan's hysteresis starts from."""
        self.cut = plan.cut
        self.last = plan
        self._planned = len(self.thread)

    def in_context(self) -> list[bool]:
        """Per thread message: whether the last committed plan showed it to the model."""
        if self.last is None:
            return [True] * len(self.thread)
        kept = self.last.in_context()
        return [i >= self._planned or m.id in kept for i, m in enumerate(self.thread)]

    # -- planning -----------------------------------------------------------------------------------
    def plan(self, pending: Sequence[Any] = ()) -> Plan:
        """The prompt for a reply to the last turn (with `pending` messages appended to the thread)."""
        cfg, budget = self.config, self.budget
        index = self.index
        n_turns = len(index)
        pend = [as_template(p) for p in pending]
        if pend and pend[0]["role"] == "user":
            end, new_msgs = n_turns, list(pend)
            new_ids: list[str | None] = [getattr(p, "id", None) for p in pending]
        else:
            if n_turns == 0 and not pend:
                raise ContextError("there is no message to reply to; send one first")
            end = n_turns - 1
            last = index.turns[end]
            new_msgs = self._dicts[last.start:last.end] + pend
            new_ids = [m.id for m in self.thread[last.start:last.end]] + [getattr(p, "id", None) for p in pending]
        summary = self.summary if self.summary is not None and 0 < self.summary.turns <= end else None
        sys_msg = {"role": "system", "content": self.system} if self.system else None
        sum_msg = ({"role": cfg.summary_role, "content": cfg.summary_prefix + summary.text} if summary else None)
        pinned_pos = sorted(p for p in self._pinned_positions() if index.turn_of[p] < end)

        fixed_other = ((budget.count(sys_msg) if sys_msg else 0) + (budget.count(sum_msg) if sum_msg else 0)
                       + sum(index.counts[p] for p in pinned_pos) + len(budget.generation_prompt))
        if fixed_other > self.prompt_budget:
            raise ContextOverflow(
                f"the system prompt, pinned messages and summary take {fixed_other} tokens but the prompt "
                f"budget is {self.prompt_budget} (window {self.window}); unpin messages or shorten the system prompt")
        base_msgs, base_tokens = new_msgs, [budget.count(m) for m in new_msgs]
        high = int(self.prompt_budget * cfg.high_watermark)
        low = int(self.prompt_budget * cfg.low_watermark)
        floor = summary.turns if summary else 0
        slack = 0  # tokens the template adds around the first message beyond its counted segment
        for _ in range(4):
            new_msgs, new_tokens, truncated = base_msgs, base_tokens, []
            if fixed_other + slack + sum(new_tokens) > self.prompt_budget:
                new_msgs, new_tokens, truncated = self._oversize(base_msgs, new_ids, base_tokens,
                                                                 fixed_other + slack)
            fixed = fixed_other + sum(new_tokens)
            cut = index.choose_cut(self.cut, end, fixed, high, low, floor)
            while True:
                plan = self._build(cut, end, sys_msg, sum_msg, summary, pinned_pos, new_msgs, new_ids, truncated)
                if plan.tokens <= self.prompt_budget or cut >= end:
                    break
                cut += 1  # the first message rendered longer than counted (a template's default system)
            if plan.tokens <= self.prompt_budget:
                return plan
            slack += plan.tokens - self.prompt_budget
        raise MessageTooLong(f"the prompt needs {plan.tokens} tokens but the budget is {self.prompt_budget}; "
                             "shorten the message")

    def _oversize(self, msgs: list[dict[str, Any]], ids: list[str | None], counts: list[int],
                  fixed_other: int) -> tuple[list[dict[str, Any]], list[int], list[str | None]]:
        room = self.prompt_budget - fixed_other
        big = max(range(len(msgs)), key=counts.__getitem__)
        if self.config.oversize != "truncate":
            raise MessageTooLong(
                f"the message has {counts[big]} tokens but at most {room - (sum(counts) - counts[big])} fit "
                f"(window {self.window}, {self.window - self.prompt_budget} kept for the reply, {fixed_other} "
                "for the system prompt, pinned messages and template); shorten it or set oversize='truncate'")
        try:
            cut_msg = self.budget.truncate(msgs[big], room - (sum(counts) - counts[big]),
                                           self.config.truncation_marker)
        except ValueError:
            raise MessageTooLong("the message cannot fit the window even truncated; shorten the other "
                                 "messages of its turn or raise the window") from None
        msgs = [*msgs[:big], cut_msg, *msgs[big + 1:]]
        counts = [*counts[:big], self.budget.count(cut_msg), *counts[big + 1:]]
        return msgs, counts, [ids[big]]

    def _build(self, cut: int, end: int, sys_msg: dict[str, Any] | None, sum_msg: dict[str, Any] | None,
               summary: SummaryState | None, pinned_pos: list[int], new_msgs: list[dict[str, Any]],
               new_ids: list[str | None], truncated: list[str | None]) -> Plan:
        index = self.index
        regions_msgs: dict[str, list[tuple[dict[str, Any], str | None]]] = {
            "system": [(sys_msg, None)] if sys_msg else [],
            "pinned": [(self._dicts[p], self.thread[p].id) for p in pinned_pos if index.turn_of[p] < cut],
            "summary": [(sum_msg, None)] if sum_msg else [],
            "history": [],
            "new": list(zip(new_msgs, new_ids, strict=True)),
        }
        if cut < end:
            a, b = index.turns[cut].start, index.turns[end - 1].end
            regions_msgs["history"] = list(zip(self._dicts[a:b], [m.id for m in self.thread[a:b]], strict=True))
        messages: list[dict[str, Any]] = []
        message_ids: list[str | None] = []
        starts: list[int] = []
        regions: dict[str, tuple[int, int]] = {}
        ids: list[int] = []
        budget = self.budget
        for name in self.config.layout.order:
            r0 = len(ids)
            for m, mid in regions_msgs[name]:
                starts.append(len(ids))
                ids += budget.first(m) if not messages else budget.segment(m)
                messages.append(m)
                message_ids.append(mid)
            if name == "new":
                ids += budget.generation_prompt
            regions[name] = (r0, len(ids))
        if not messages:
            ids = budget.join([])
        elif not budget.additive:
            ids = budget.render(messages)
            regions["new"] = (regions["new"][0], len(ids))
        prev = self.last
        pruned_now = max(0, cut - prev.cut) if prev is not None else cut
        return Plan(ids=ids, messages=messages, message_ids=message_ids, starts=starts, regions=regions,
                    tokens_by_region={k: e - s for k, (s, e) in regions.items()}, window=self.window,
                    budget=self.prompt_budget, cut=cut, history_turns=end,
                    summary_turns=summary.turns if summary else 0, pruned_now=pruned_now,
                    truncated=tuple(truncated))
