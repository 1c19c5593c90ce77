"""`ChatSession`: the library entry point. A session in storage, a context manager, a KV slot.

    s = ChatSession.create(engine, store, system="You are terse.")
    for ev in s.send("Hello", temperature=0.0):
        print(ev.text, end="")
    print(ev.report)

The user's message is stored before generation starts; the reply is checkpointed while it streams
(storage's ReplyWriter); cancelling keeps the partial text, marked cancelled. Edits and
regenerations are branches, never overwrites. While Redis is unreachable a turn's messages are kept in
memory (`pending`) and a background retry (context/outbox.py) writes them once it answers; `on_save` says
when, `close()` stops it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .budget import TokenBudget, WithTools
from .errors import ContextError, SessionBusy, SessionDeleted
from .layout import ContextConfig
from .manager import ContextManager, Pending
from .outbox import Outbox, SaveEvent
from .plan import Plan
from .report import TurnReport
from .slots import SlotPool
from .summarize import SummaryResult
from .turn import Turn, begin_turn

log = logging.getLogger("context")
_BUDGETS: weakref.WeakKeyDictionary[Any, TokenBudget] = weakref.WeakKeyDictionary()
_TOOL_BUDGETS: weakref.WeakKeyDictionary[Any, dict[str, TokenBudget]] = weakref.WeakKeyDictionary()
_MAX_TOOL_SETS = 32   # budgets kept per tokenizer for distinct tool lists (oldest dropped first)


def _budget_for(tokenizer: Any, tools: list[dict[str, Any]] | None = None) -> TokenBudget:
    """One TokenBudget (segment cache, template probe) per tokenizer, shared by its sessions; with ``tools``, one
    per tokenizer and tool list (the template renders them)."""
    if tools:
        return _tool_budget(tokenizer, tools)
    try:
        b = _BUDGETS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        return TokenBudget(tokenizer)
    if b is None:
        b = _BUDGETS[tokenizer] = TokenBudget(tokenizer)
    return b


def _tool_budget(tokenizer: Any, tools: list[dict[str, Any]]) -> TokenBudget:
    import json

    key = json.dumps(tools, sort_keys=True)
    try:
        per = _TOOL_BUDGETS.setdefault(tokenizer, {})
    except TypeError:
        return TokenBudget(WithTools(tokenizer, tools))
    b = per.pop(key, None)
    if b is None:
        b = TokenBudget(WithTools(tokenizer, tools))
    per[key] = b
    while len(per) > _MAX_TOOL_SETS:
        per.pop(next(iter(per)))
    return b


@dataclass(frozen=True)
class ChatMessage:
    """A message of the current branch. `in_context`: the model saw it in the last planned turn
    (False once its turn was pruned; it stays in storage and in the UI). `status`: complete,
    streaming, incomplete or cancelled. `pending`: not yet in storage (Redis was unreachable); it is
    written, whole, by the session's background retry as soon as Redis answers (or by the next call that
    reaches Redis, whichever comes first)."""

    id: str
    role: str
    content: str
    status: str
    in_context: bool
    pinned: bool
    parent_id: str | None
    created_at: float
    pending: bool = False


@dataclass(frozen=True)
class ChatEvent:
    """A piece of the streaming reply. The last event of a reply has `finish_reason` ("stop",
    "length" or "cancelled") and `report`; `summary` is set when this turn wrote a new summary; its `token_id` is
    set only when its token is part of the reply (an end on the length limit)."""

    text: str
    message_id: str
    token_id: int | None = None
    finish_reason: str | None = None
    report: TurnReport | None = None
    summary: SummaryResult | None = None
    logprob: float | None = None          # with SamplingParams.logprobs: the token's (the engine's TokenEvent)
    top_logprobs: tuple[tuple[int, float], ...] | None = None


def branch_positions(conv: Any, thread: Iterable[Any]) -> dict[str, tuple[int, int]]:
    """For each message of `thread` that has alternatives in `conv` (a storage.Conversation): its
    (position, count) among them, oldest first, the position counted from 1 (as `switch_branch` returns)."""
    out: dict[str, tuple[int, int]] = {}
    for m in thread:
        if m.id not in conv.by_id:
            continue
        ids = [s.id for s in conv.siblings(m.id)]
        if len(ids) > 1:
            out[m.id] = (ids.index(m.id) + 1, len(ids))
    return out


def sampling_params(values: dict[str, Any]) -> Any:
    """chatcore.SamplingParams from plain values; unknown names raise a one-line ValueError."""
    from chatcore.sampling import SamplingParams

    names = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown sampling parameter {unknown[0]!r}; use one of {', '.join(sorted(names))}")
    return SamplingParams(**values)


class ChatSession:
    def __init__(self, engine: Any, store: Any, record: Any, thread: list[Any], *,
                 config: ContextConfig | None = None, pool: SlotPool | None = None,
                 tools: list[dict[str, Any]] | None = None) -> None:
        self.engine = engine
        self.store = store
        self.config = config or ContextConfig()
        self.id: str = record.id
        self._record = record
        self.tools = tools or None
        self.manager = ContextManager(_budget_for(engine.require_tokenizer(), self.tools), engine.window, self.config)
        self.manager.set_system(record.system_prompt)
        self.manager.pinned = tuple(record.pinned)
        self.manager.reset(thread)
        if record.summary is not None:
            self.manager.set_summary(record.summary.text, last_id=record.summary.last_id)
        self.pool = pool if pool is not None else SlotPool(engine.new_slot)
        self.last_report: TurnReport | None = None
        self._cancel = threading.Event()
        self._busy = False
        self._outbox = Outbox(getattr(store, "where", "storage"))  # writes waiting for Redis, retried in the background
        self._refresh()

    # -- create / open ------------------------------------------------------------------------------
    @classmethod
    def create(cls, engine: Any, store: Any, *, system: str | None = None, window: int | None = None,
               title: str = "", config: ContextConfig | None = None, pool: SlotPool | None = None,
               **sampling: Any) -> ChatSession:
        """A new session in `store` (storage.open_store()). `window` caps the model's window;
        `sampling` sets default SamplingParams fields (temperature=..., max_new_tokens=...)."""
        config = config or ContextConfig()
        if window is not None:
            config = dataclasses.replace(config, window=window)
        sampling_params(sampling)
        record = store.create_session(title, model=getattr(engine, "source", None) or None, system_prompt=system,
                                      sampling=sampling)
        return cls(engine, store, record, [], config=config, pool=pool)

    @classmethod
    def open(cls, engine: Any, store: Any, session_id: str, *, window: int | None = None,
             config: ContextConfig | None = None, pool: SlotPool | None = None) -> ChatSession:
        """Resume a stored session: its current branch, pins, summary and parameters. The KV cache is
        rebuilt on the next turn (or now, with `warm()`)."""
        config = config or ContextConfig()
        if window is not None:
            config = dataclasses.replace(config, window=window)
        conv = store.load(session_id)
        return cls(engine, store, conv.session, conv.thread(), config=config, pool=pool)

    @staticmethod
    def list(store: Any, offset: int = 0, limit: int = 50) -> list[Any]:
        """Stored sessions, most recently active first (storage.Session records)."""
        return list(store.list_sessions(offset, limit).sessions)

    # -- reading ------------------------------------------------------------------------------------
    @property
    def window(self) -> int:
        return self.manager.window

    @property
    def system(self) -> str | None:
        return self.manager.system

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._record.sampling)

    def messages(self) -> list[ChatMessage]:
        """The current branch, root first."""
        pinned = set(self.manager.pinned)
        waiting = set(self._outbox.pending)
        return [ChatMessage(m.id, m.role, m.content, m.status, ctx, m.id in pinned, m.parent_id, m.created_at,
                            m.id in waiting)
                for m, ctx in zip(self.manager.thread, self.manager.in_context(), strict=True)]

    def plan(self, text: str | None = None) -> Plan:
        """What the model would see if `text` were sent now (or for a reply to the last turn). No side
        effects."""
        return self.manager.plan([Pending("user", text)] if text is not None else [])

    def export(self, fmt: str = "json") -> str:
        """The whole session (every branch) as "json" (OpenAI-style messages) or "markdown"."""
        from storage.export import to_json_text, to_markdown

        conv = self.store.load(self.id)
        if fmt == "json":
            return to_json_text(conv)
        if fmt == "markdown":
            return to_markdown(conv)
        raise ValueError(f"export format must be 'json' or 'markdown', got {fmt!r}")

    # -- what a front end shows and switches ----------------------------------------------------------
    @property
    def pinned(self) -> tuple[str, ...]:
        """Ids of the pinned messages (kept in context whatever is pruned)."""
        return tuple(self.manager.pinned)

    @property
    def summary(self) -> str | None:
        """The summary of pruned turns the model sees, if one is in use."""
        return self.manager.summary.text if self.manager.summary is not None else None

    def branches(self) -> dict[str, tuple[int, int]]:
        """Read-only: (position, count) of each message of the current branch that has alternatives (edits,
        regenerations), keyed by message id; the position counted from 1, as `switch_branch` returns it."""
        return branch_positions(self.store.load(self.id), self.manager.thread)

    def switch_branch(self, message_id: str, step: int = 1) -> tuple[int, int]:
        """Show another branch through `message_id`'s alternatives (edits, regenerations): `step` siblings
        on, wrapping. The thread becomes that sibling's latest branch, as `open` would load it. Returns
        (position, count), the position counted from 1."""
        self._idle()
        siblings = [m.id for m in self.store.load(self.id).siblings(message_id)]
        if len(siblings) < 2:
            raise ContextError("this message has no other branch (edit or regenerate to make one)")
        at = (siblings.index(message_id) + step) % len(siblings)
        self.store.switch_branch(self.id, siblings[at])
        conv = self.store.load(self.id)
        self._record = conv.session
        self.manager.pinned = tuple(conv.session.pinned)
        self.manager.reset(conv.thread())
        summary = conv.session.summary
        self.manager.set_summary(summary.text if summary is not None else None,
                                 last_id=summary.last_id if summary is not None else None)
        self._refresh()
        return at + 1, len(siblings)

    # -- what storage has not got yet ----------------------------------------------------------------
    @property
    def unsaved(self) -> tuple[str, ...]:
        """Ids of the messages kept in memory because Redis was unreachable, oldest first (they are the
        `pending` ones of `messages()`). A background thread writes them as soon as Redis answers."""
        return self._outbox.pending

    def on_save(self, listener: Callable[[SaveEvent], None]) -> None:
        """Call `listener(SaveEvent)` when messages become pending and when pending ones are written (or
        dropped), from the thread that did it (the background retry's, or the caller's): keep it short and
        thread-safe (a Textual app posts a message)."""
        self._outbox.subscribe(listener)

    def close(self) -> tuple[str, ...]:
        """Stop the background retry after one last attempt (bounded by the store's timeouts). Returns the
        ids still unsaved: they are lost when the process ends. The store is the caller's to close."""
        return self._outbox.close()

    # -- settings -----------------------------------------------------------------------------------
    def set_params(self, **sampling: Any) -> None:
        """Change default sampling parameters (merged into the stored ones); None removes one."""
        merged = {**self._record.sampling, **sampling}
        merged = {k: v for k, v in merged.items() if v is not None}
        sampling_params(merged)
        self._record = self.store.update_session(self.id, sampling=merged)

    def set_tools(self, tools: list[dict[str, Any]] | None) -> None:
        """The function tools the chat template renders from the next turn on (None: none). Not stored: each
        turn's caller says which tools it offers (the server: each request's `tools`)."""
        tools = tools or None
        if tools == self.tools:
            return
        self._idle()
        self.tools = tools
        self.manager.set_budget(_budget_for(self.engine.require_tokenizer(), tools))

    def set_system(self, text: str | None) -> None:
        self._idle()
        self._record = self.store.update_session(self.id, system_prompt=text or None)
        self.manager.set_system(text)
        self._refresh()

    def pin(self, message_id: str) -> None:
        """Keep `message_id` in context whatever is pruned (it moves to the pinned region when its turn goes)."""
        self.manager.position(message_id)
        self._record = self.store.pin(self.id, message_id)
        self.manager.set_pinned(self._record.pinned)
        self._refresh()

    def unpin(self, message_id: str) -> None:
        self._record = self.store.unpin(self.id, message_id)
        self.manager.set_pinned(self._record.pinned)
        self._refresh()

    def cancel(self) -> None:
        """Stop the streaming reply after the current token (safe from another thread)."""
        self._cancel.set()

    # -- turns --------------------------------------------------------------------------------------
    def send(self, text: str, **sampling: Any) -> Iterator[ChatEvent]:
        """Store `text` as the user's message now, and return the reply's event stream. Empty or
        whitespace-only text is refused (`ContextError`), nothing stored."""
        if not isinstance(text, str):
            raise ContextError(f"the message must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ContextError("the message is empty (nothing but whitespace); send some text")
        self._idle()
        params = self._params(sampling)
        self.manager.plan([Pending("user", text)])  # refuse a message that cannot fit before storing it
        parent = self.manager.thread[-1].id if self.manager.thread else None
        try:
            msg, before = self._store_user(text, parent)
        except Exception as exc:
            raise self._deleted(exc, "the message was not stored") from None
        self.manager.append(msg)
        return self._reply(params, lambda: self.store.begin_reply(self.id, parent_id=msg.id, before=before))

    def regenerate(self, **sampling: Any) -> Iterator[ChatEvent]:
        """A new reply to the last user message, as a sibling of the last reply (kept as a branch)."""
        self._idle()
        self._try_save()
        params = self._params(sampling)
        thread = self.manager.thread
        if not thread:
            raise ContextError("there is nothing to regenerate; send a message first")
        last = thread[-1]
        if last.role == "assistant":
            def begin() -> Any:
                writer = self.store.regenerate(self.id, last.id)
                self.manager.truncate(self.manager.position(last.id))
                return writer
            return self._reply(params, begin)
        return self._reply(params, lambda: self.store.begin_reply(self.id, parent_id=last.id))

    def edit(self, message_id: str, text: str, **sampling: Any) -> Iterator[ChatEvent]:
        """Store an edited copy of `message_id` as a new branch (the original stays). Editing a user
        message returns the stream of a new reply to it; editing a reply returns an empty stream."""
        self._idle()
        self._try_save()
        params = self._params(sampling)
        pos = self.manager.position(message_id)
        new = self.store.edit_message(self.id, message_id, text)
        self.manager.truncate(pos)
        self.manager.append(new)
        if new.role != "user":
            self._refresh()
            return iter(())
        return self._reply(params, lambda: self.store.begin_reply(self.id, parent_id=new.id))

    def warm(self) -> int:
        """Prefill the KV slot with the current context now (after `open`); returns tokens computed."""
        if not self.manager.thread:
            return 0
        plan = self.manager.plan()
        ids = plan.ids[: len(plan.ids) - len(self.manager.budget.generation_prompt)]
        slot = self.pool.get(self.id, self.window)
        keep = min(slot.common_prefix(ids), len(ids))
        slot.truncate(keep)
        if keep < len(ids):
            self.engine.prefill(ids[keep:], slot)
        self.pool.trim(keep=self.id)
        return len(ids) - keep

    # -- internals ----------------------------------------------------------------------------------
    def _idle(self) -> None:
        if self._busy:
            raise SessionBusy("a reply is still streaming in this session; finish or cancel it first")

    def _save_unsaved(self) -> None:
        """Write what an unreachable Redis kept in memory, oldest first; raises StoreUnavailable (keeping
        the rest) while it is still down."""
        self._outbox.flush()

    def _try_save(self) -> None:
        """Write what is pending if Redis is back; if not, the call goes on (and says so if it must)."""
        from storage.errors import StoreUnavailable

        with contextlib.suppress(StoreUnavailable):
            self._save_unsaved()

    def _store_user(self, text: str, parent: str | None) -> tuple[Any, Callable[[], Any] | None]:
        """Store the user's message (after anything still unsaved). With Redis down, the message is
        kept (pending, retried in the background) and returned with the write its reply must make first
        (one that never waits for the retry thread: the token stream must not)."""
        from storage.errors import StoreUnavailable
        from storage.keys import new_id
        from storage.records import Message

        mid = new_id()

        def append() -> Any:
            return self.store.append_message(self.id, "user", text, parent_id=parent, message_id=mid)
        try:
            self._save_unsaved()
            return append(), None
        except StoreUnavailable as exc:
            now = time.time()
            self._outbox.add(mid, append, exc)
            return Message(mid, self.id, "user", text, parent, "complete", now, now, None, -1, {}), \
                lambda: self._outbox.flush(wait=False)

    def _params(self, overrides: dict[str, Any]) -> Any:
        return sampling_params({**self._record.sampling, **overrides})

    def _refresh(self) -> None:
        """Re-plan the current thread (no generation) so `messages()` shows what is in context."""
        if self.manager.thread:
            with contextlib.suppress(ContextError):
                self.manager.commit(self.manager.plan())

    def _store_summary(self, result: SummaryResult, last: Any) -> None:
        """The turn's new summary (covering the thread up to `last`) goes to storage first."""
        self._record = self.store.set_summary(self.id, result.text, self.manager.thread[0].id, last.id,
                                              tokens=result.generated_tokens)

    def _reply(self, params: Any, begin: Callable[[], Any]) -> Iterator[ChatEvent]:
        self._idle()
        self._busy = True
        self._cancel.clear()
        try:
            yield from self._stream(params, begin)
        finally:
            self._busy = False

    def _deleted(self, exc: BaseException, lost: str) -> BaseException:
        """`exc` itself, or where it is storage's NotFound and this session is gone from storage (deleted by
        another client meanwhile): a one-line SessionDeleted saying so and what was `lost`."""
        from storage.errors import NotFound, StorageError

        if not isinstance(exc, NotFound):
            return exc
        try:
            gone = not self.store.session_exists(self.id)
        except StorageError:
            return exc
        if not gone:
            return exc
        return SessionDeleted(f"session {self.id} was deleted in storage meanwhile (by another client); {lost}. "
                              "Open or start another session")

    def _abandon(self, writer: Any) -> None:
        """A reply whose session is gone: stop its writer (no more saves, no heartbeat), free the KV slot."""
        writer.gone = True
        self.pool.discard(self.id)

    def _stream(self, params: Any, begin: Callable[[], Any]) -> Iterator[ChatEvent]:
        try:
            writer = begin()
        except Exception as exc:
            raise self._deleted(exc, "no reply was generated") from None
        try:
            slot = self.pool.get(self.id, self.manager.window)
            turn = begin_turn(self.manager, slot, self.engine, on_summary=self._store_summary)
        except BaseException:
            writer.fail()
            raise
        n = 0
        status = "complete"
        last = gen = None
        try:
            gen = turn.generate(self.engine, params, slot)
            for ev in gen:
                if ev.finish_reason is not None:
                    last = ev
                    if ev.text:
                        writer.write(ev.text, tokens=0)
                    break
                n += 1
                if not writer.write(ev.text):
                    status = "incomplete"
                    break
                yield ChatEvent(ev.text, writer.id, ev.token_id, logprob=ev.logprob, top_logprobs=ev.top_logprobs)
                if self._cancel.is_set():
                    status = "cancelled"
                    break
        except GeneratorExit:  # the caller closed the reply stream
            self._end(turn, gen, None, writer, "cancelled", n, quiet=True)
            raise
        except BaseException as exc:
            if gen is not None:
                gen.close()
            error = self._deleted(exc, f"the reply ({n} tokens) was not saved")
            if error is not exc:   # the reply's first save found the session gone (its pending message dropped)
                self._abandon(writer)
                raise error from None
            self._finish(writer, "incomplete", n, quiet=True)
            raise
        report = self._end(turn, gen, last, writer, status, n)
        finish = last.finish_reason if last is not None else ("stop" if status == "complete" else "cancelled")
        # when the last token is part of the reply (a length end), its id and logprobs come with the last event
        counted = last is not None and last.stats is not None and last.stats.generated_tokens > n
        tok, lp, top = (last.token_id, last.logprob, last.top_logprobs) if counted else (None, None, None)
        yield ChatEvent(last.text if last is not None else "", writer.id, tok, finish, report, turn.summary, lp, top)

    def _end(self, turn: Turn, gen: Any, last: Any, writer: Any, status: str, n: int,
             quiet: bool = False) -> TurnReport:
        """Close the engine's stream (its stats then cover an early end too), store the reply, report.
        Raises SessionDeleted when the reply cannot be stored because its session is gone (`quiet`: log it)."""
        gen.close()
        stats = last.stats if last is not None else getattr(gen, "stats", None)
        self._finish(writer, status, stats.generated_tokens if stats is not None else n, quiet)
        self.last_report = dataclasses.replace(turn.report(stats), unsaved=len(self._outbox))
        self.pool.trim(keep=self.id)
        return self.last_report

    def _finish(self, writer: Any, status: str, tokens: int, quiet: bool = False) -> None:
        """Store the reply as `status` (kept pending while Redis is unreachable). Where its session is gone
        from storage (the writer found its reply deleted, or its first save found no session): SessionDeleted,
        or with `quiet` a log line."""
        from storage.errors import NotFound

        lost = f"the reply ({tokens} tokens) was not saved"
        if writer.gone:
            error = self._deleted(NotFound("message", writer.id), lost)
            if not isinstance(error, SessionDeleted):
                return  # the reply alone was deleted elsewhere: it ends here
        else:
            try:
                self.manager.append(self._store_reply(writer, status, tokens))
                return
            except NotFound as exc:
                error = self._deleted(exc, lost)
                if error is exc:
                    raise
        self._abandon(writer)
        if quiet:
            log.warning("%s", error)
            return
        raise error from None

    def _store_reply(self, writer: Any, status: str, tokens: int) -> Any:
        """The finished reply as stored, or (Redis unreachable) as kept whole in memory, pending."""
        from storage.errors import StoreUnavailable

        try:
            return writer.finish(status, tokens=tokens)
        except StoreUnavailable as exc:  # written once Redis answers
            self._outbox.add(writer.id, lambda: writer.finish(status, tokens=tokens), exc)
            return writer.draft(status, tokens)
