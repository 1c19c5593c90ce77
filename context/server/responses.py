"""`/v1/responses`: stateful turns on chatcore sessions.

Mapping (docs in README "Serving"):
- A stored response is a turn of a session: its input items are appended as messages, its reply is the
  session's assistant message (`output[0].id` is that message's id), and a record (storage/responses.py)
  names them. `conversation` is the session id.
- `previous_response_id: R` appends the new input under R's reply: on the branch R ends, a new branch when
  R's reply already has a continuation (storage keeps both; the session's tip moves to the new turn, as an
  edit in the TUI does). `conversation: C` appends at C's tip. Neither: a new session (its title the input's
  first words, its system prompt `instructions`).
- `instructions` on a later turn replace the session's system prompt for that turn only.
- The turn runs through a ChatSession: `truncation: "auto"` lets its context manager drop whole old turns
  (system prompt and pinned messages stay; a summary when the server runs with --summarize);
  `"disabled"` sends the whole history or answers 400 context_length_exceeded, storing nothing.
- `store: false` reads the history as above but stores nothing (no messages, no record).
- `tools` are rendered by the chat template (unless `tool_choice: "none"`), and the reply's text is parsed for tool
  calls whenever its response is read (stored raw, as the model wrote it): `function_call` items after the message.
- `include: ["message.output_text.logprobs"]` (and `top_logprobs`): the reply's logprobs in its output_text, in this
  response only (they are not stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import ContextError
from ..manager import ContextManager, Pending
from ..session import _budget_for
from .errors import APIError, bad_request, not_found, too_long, translate
from .items import NewItem, input_items, join_users, output_item, store_items
from .logprobs import token_logprob
from .pump import Pump
from .sampling import check, sampling_fields
from .schemas import ResponseRequest
from .state import ServerState
from .tool_calls import CallStream, parse
from .tool_output import ToolUse, function_call_items, tool_use

log = logging.getLogger("chatcore.serve")
_TITLE_CHARS = 60


@dataclass(frozen=True)
class ResponseJob:
    id: str
    created_at: float
    model: str
    items: list[NewItem]
    sampling: dict[str, Any]
    strict: bool
    store: bool
    stream: bool
    previous_id: str | None
    conversation: str | None
    instructions: str | None
    params: dict[str, Any]
    metadata: dict[str, Any]
    tools: ToolUse = ToolUse(None, frozenset())
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Started:
    """The turn is planned (and its input stored): where it lives."""

    session_id: str | None
    input_ids: tuple[str, ...]


@dataclass
class Piece:
    """A piece of the reply's text as it streams, the message it goes to (None: not stored), its token's
    logprob entries (asked for: one, else none)."""

    text: str
    message_id: str | None
    logprobs: list[dict[str, Any]]


@dataclass
class Done:
    """The turn's end: the response object (and the stored record, when stored)."""

    response: dict[str, Any]


@dataclass
class _Tally:
    reply: Any = None          # the stored reply (storage.Message), or text for store=false
    reply_id: str | None = None
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish: str | None = None
    report: Any = None
    stats: Any = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    def count_logprob(self, state: ServerState, job: ResponseJob, ev: Any) -> None:
        if job.logprobs and ev.logprob is not None and ev.token_id is not None:
            self.logprobs.append(token_logprob(state.token_texts, ev, job.top_logprobs))


def prepare(state: ServerState, req: ResponseRequest) -> ResponseJob:
    model = state.check_model(req.model)
    conv = req.conversation.id if req.conversation is not None and not isinstance(req.conversation, str) \
        else req.conversation
    if conv is not None and req.previous_response_id is not None:
        raise bad_request("give previous_response_id or conversation, not both", "conversation")
    items = input_items(req.input)
    if items[-1].role not in ("user", "tool"):
        raise bad_request("the last input item must be a user message or a function_call_output", "input")
    wanted = req.max_output_tokens or state.engine.window
    tools = tool_use(req.tools, req.tool_choice)
    logprobs = "message.output_text.logprobs" in (req.include or []) or bool(req.top_logprobs)
    top = req.top_logprobs or 0
    sampling = sampling_fields(req, max_tokens=wanted, logprobs=logprobs, top_logprobs=top)
    params = {"temperature": req.temperature, "top_p": req.top_p, "max_output_tokens": req.max_output_tokens,
              "truncation": req.truncation, "tools": req.tools or [], "tool_choice": tools.choice,
              "top_logprobs": top}
    return ResponseJob("resp_" + _new_id(), time.time(), model, items, sampling, req.truncation == "disabled",
                       req.store, req.stream, req.previous_response_id, conv, req.instructions, params,
                       dict(req.metadata or {}), tools, logprobs, top)


def _new_id() -> str:
    from storage.keys import new_id

    return new_id()


# -- the turn, in its worker thread ------------------------------------------------------------------------------
def _origin(state: ServerState, job: ResponseJob) -> tuple[Any, str | None]:
    """(the stored Conversation the turn continues or None, the message it goes under or None)."""
    from storage import NotFound

    store = state.store
    if job.previous_id is not None:
        try:
            rec = store.get_response(job.previous_id)
            conv = store.load(rec.session_id)
        except NotFound:
            raise not_found(f"no stored response {job.previous_id!r} (it was not stored, or was deleted)",
                            "previous_response_id") from None
        parent = rec.output_id or (rec.input_ids[-1] if rec.input_ids else None)
        if parent is not None and parent not in conv.by_id:
            raise not_found(f"response {job.previous_id!r} points at a message its conversation no longer has",
                            "previous_response_id")
        return conv, parent
    if job.conversation is not None:
        try:
            conv = store.load(job.conversation)
        except NotFound:
            raise not_found(f"no conversation {job.conversation!r}", "conversation") from None
        return conv, conv.session.tip_id
    return None, None


def _check_plan(plan: Any, strict: bool) -> None:
    if strict and (plan.turns_dropped or any(t is not None for t in plan.truncated)):
        raise too_long(f"the conversation takes more than the {plan.budget}-token prompt budget of the context "
                       f"window ({plan.window}); send it with truncation: \"auto\" to let old turns be dropped")


def run_stored(state: ServerState, job: ResponseJob) -> Iterator[Any]:
    """Plan, store the input, stream the reply, save the record; yields Started, Pieces, Done."""
    store = state.store
    conv, parent = _origin(state, job)
    created = conv is None
    if created:
        first = next((i.content for i in job.items if i.role == "user"), "")
        title = " ".join(first.split())[:_TITLE_CHARS]
        record = store.create_session(title, model=job.model, system_prompt=job.instructions)
        conv = store.load(record.id)
    sid = conv.session.id
    try:
        with state.busy(sid):
            yield from _stored_turn(state, job, sid, parent, created)
    except BaseException:
        if created and store.session_exists(sid) and not store.load(sid).messages:
            with contextlib.suppress(Exception):
                store.delete_session(sid)   # nothing was stored in it: leave no empty session behind
        raise


def _stored_turn(state: ServerState, job: ResponseJob, sid: str, parent: str | None, created: bool) -> Iterator[Any]:
    store = state.store
    conv = store.load(sid)   # re-read under the session's hold: the thread as it is now
    thread = conv.thread(parent) if parent is not None else []
    join, items = join_users(job.items, thread[-1] if thread else None)
    head = thread[:-1] if join else thread
    session = state.session(conv, head, job.strict, job.tools.template)
    system = job.instructions if job.instructions is not None else conv.session.system_prompt
    if session.manager.system != (system or None):
        session.manager.set_system(system)
    try:
        plan = session.manager.plan([Pending(i.role, i.content) for i in items])
    except ContextError as exc:
        raise too_long(str(exc)) from None
    _check_plan(plan, job.strict)
    stored = store_items(store, sid, thread[-1] if thread else None, items, join)
    for msg in stored:
        session.manager.append(msg)
    inputs = [m.id for m in stored]
    yield Started(sid, tuple(inputs))
    tally = _Tally()
    error: BaseException | None = None
    stream = session.regenerate(**job.sampling)
    try:
        for ev in stream:
            if tally.reply_id is None:   # readable (in progress, its text as checkpointed) from any server now
                tally.reply_id = ev.message_id
                _save(state, job, sid, inputs, tally, None, status="in_progress")
            if ev.finish_reason is not None:
                tally.finish, tally.report = ev.finish_reason, ev.report
            elif ev.token_id is not None:
                tally.tokens += 1
            seen = len(tally.logprobs)
            tally.count_logprob(state, job, ev)
            tally.text.append(ev.text)
            yield Piece(ev.text, ev.message_id, tally.logprobs[seen:])
    except GeneratorExit:
        tally.finish = tally.finish or "cancelled"
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        stream.close()
        last = session.manager.thread[-1] if session.manager.thread else None
        if last is not None and last.id == tally.reply_id:
            tally.reply = last
        rec = _save(state, job, sid, inputs, tally, error)
    yield Done(response_object(state, rec, [tally.reply] if tally.reply is not None else [],
                               conversation=sid, logprobs=tally.logprobs if job.logprobs else None))


def _status(finish: str | None, error: BaseException | None) -> tuple[str, str | None]:
    if error is not None:
        return "failed", None
    if finish == "length":
        return "incomplete", "max_output_tokens"
    if finish == "cancelled" or finish is None:
        return "cancelled", None
    return "completed", None


def _usage(tally: _Tally) -> dict[str, Any]:
    report = tally.report
    prompt = report.tokens_used if report is not None else 0
    cached = report.cache_hit_tokens if report is not None else 0
    out = tally.reply.tokens if tally.reply is not None and getattr(tally.reply, "tokens", None) is not None \
        else tally.tokens
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + out}


def _save(state: ServerState, job: ResponseJob, sid: str, inputs: list[str], tally: _Tally,
          error: BaseException | None, status: str | None = None) -> Any:
    from storage import ResponseRecord, StorageError

    status, reason = (status, None) if status is not None else _status(tally.finish, error)
    err = translate(error).body()["error"] if error is not None else None
    rec = ResponseRecord(id=job.id, session_id=sid, created_at=job.created_at, status=status, model=job.model,
                         input_ids=tuple(inputs), output_id=tally.reply_id, previous_id=job.previous_id,
                         instructions=job.instructions, usage=_usage(tally), params=job.params,
                         metadata=job.metadata, error=err, incomplete_reason=reason)
    try:
        state.store.save_response(rec)
    except StorageError as exc:   # the turn's messages are stored (or kept for the retry); only the record is lost
        log.warning("chatcore serve: response %s not stored: %s", job.id, exc)
    return rec


def run_unstored(state: ServerState, job: ResponseJob) -> Iterator[Any]:
    """store: false: the history read as for a stored turn, nothing written; yields Started, Pieces, Done."""
    from storage import ResponseRecord

    conv, parent = _origin(state, job)
    thread = conv.thread(parent) if conv is not None and parent is not None else []
    cfg = state.config.strict_context if job.strict else dataclasses.replace(state.config.context, summarize=False)
    manager = ContextManager(_budget_for(state.tokenizer, job.tools.template), state.engine.window, cfg)
    system = job.instructions if job.instructions is not None else (conv.session.system_prompt if conv else None)
    manager.set_system(system)
    join, items = join_users(job.items, thread[-1] if thread else None)
    head = thread[:-1] if join else thread
    manager.reset([*head, *(dataclasses.replace(item, id=f"input-{i}") for i, item in enumerate(items))])
    try:
        plan = manager.plan()
    except ContextError as exc:
        raise too_long(str(exc)) from None
    _check_plan(plan, job.strict)
    yield Started(None, ())
    want = job.sampling.get("max_new_tokens", plan.window)
    params = check({**job.sampling, "max_new_tokens": max(1, min(want, plan.window - len(plan.ids)))})
    tally = _Tally(reply_id="msg_" + secrets.token_hex(12))
    gen = state.engine.generate(plan.ids, params)
    try:
        for ev in gen:
            seen = len(tally.logprobs)
            if ev.finish_reason is not None:
                tally.finish, tally.stats = ev.finish_reason, ev.stats
                if ev.stats is not None and ev.stats.generated_tokens > tally.tokens:   # its token is in the reply
                    tally.count_logprob(state, job, ev)
            else:
                tally.tokens += 1
                tally.count_logprob(state, job, ev)
            tally.text.append(ev.text)
            yield Piece(ev.text, tally.reply_id, tally.logprobs[seen:])
    finally:
        gen.close()
    stats = tally.stats
    status, reason = _status(tally.finish, None)
    out = stats.generated_tokens if stats is not None else tally.tokens
    prompt = len(plan.ids)
    usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": stats.cached_tokens if stats else 0},
             "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + out}
    sid = conv.session.id if conv is not None else "unstored"
    rec = ResponseRecord(id=job.id, session_id=sid, created_at=job.created_at, status=status, model=job.model,
                         output_id=tally.reply_id, previous_id=job.previous_id, instructions=job.instructions,
                         usage=usage, params=job.params, metadata=job.metadata, incomplete_reason=reason)
    reply = _Draft(tally.reply_id, "".join(tally.text), "complete" if status == "completed" else "incomplete")
    yield Done(response_object(state, rec, [reply], conversation=None, store=False,
                               logprobs=tally.logprobs if job.logprobs else None))


@dataclass(frozen=True)
class _Draft:
    id: str
    content: str
    status: str
    role: str = "assistant"
    extra: dict[str, Any] = field(default_factory=dict)


# -- the response object ---------------------------------------------------------------------------------------------
def response_object(state: ServerState, rec: Any, output: list[Any], *, conversation: str | None,
                    store: bool = True, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """OpenAI's Response object for a record and its output messages (a reply's tool calls parsed from its text,
    with the record's tools; `logprobs`: the reply's, in its output_text)."""
    status = rec.status
    p = rec.params
    names = _tool_names(p)
    items: list[dict[str, Any]] = []
    for m in output:
        items += reply_items(m, "completed" if status == "completed" else "incomplete", names, logprobs)
    return {
        "id": rec.id, "object": "response", "created_at": int(rec.created_at), "status": status,
        "model": rec.model, "output": items, "previous_response_id": rec.previous_id,
        "instructions": rec.instructions, "usage": rec.usage or None, "error": rec.error,
        "incomplete_details": {"reason": rec.incomplete_reason} if rec.incomplete_reason else None,
        "conversation": {"id": conversation} if conversation else None, "metadata": rec.metadata,
        "temperature": p.get("temperature"), "top_p": p.get("top_p"), "max_output_tokens": p.get("max_output_tokens"),
        "truncation": p.get("truncation", "disabled"), "tools": p.get("tools", []),
        "tool_choice": p.get("tool_choice", "auto"), "top_logprobs": p.get("top_logprobs", 0),
        "parallel_tool_calls": False, "store": store, "text": {"format": {"type": "text"}},
    }


def _tool_names(params: dict[str, Any]) -> frozenset[str]:
    """The functions whose calls a record's reply is parsed for (its request's tools and tool_choice)."""
    try:
        return tool_use(params.get("tools") or None, params.get("tool_choice", "auto")).names
    except APIError:   # a record written before tools were checked
        return frozenset()


def reply_items(m: Any, status: str, names: frozenset[str], logprobs: list[dict[str, Any]] | None = None
                ) -> list[dict[str, Any]]:
    """A reply's output items: its message (the text outside any tool calls; none when that is empty and there
    are calls), then one `function_call` item per parsed call."""
    item = output_item(m, status)
    if m.role != "assistant":
        return [item]
    parsed = parse(m.content, names) if names else None
    if parsed is not None and parsed.calls:
        item["content"][0]["text"] = parsed.content
    if logprobs is not None:
        item["content"][0]["logprobs"] = logprobs
    calls = function_call_items(m.id, parsed.calls, status) if parsed is not None else []
    if calls and not parsed.content:
        return calls
    return [item, *calls]


def stored_response(state: ServerState, response_id: str) -> dict[str, Any]:
    """GET /v1/responses/{id}: the record with its reply as the session holds it now."""
    from storage import NotFound

    try:
        rec = state.store.get_response(response_id)
        conv = state.store.load(rec.session_id)
    except NotFound:
        raise not_found(f"no stored response {response_id!r}", "response_id") from None
    reply = conv.by_id.get(rec.output_id) if rec.output_id else None
    return response_object(state, rec, [reply] if reply is not None else [], conversation=rec.session_id)


def input_item_list(state: ServerState, response_id: str) -> list[dict[str, Any]]:
    from storage import NotFound

    try:
        rec = state.store.get_response(response_id)
        conv = state.store.load(rec.session_id)
    except NotFound:
        raise not_found(f"no stored response {response_id!r}", "response_id") from None
    return [output_item(conv.by_id[i]) for i in rec.input_ids if i in conv.by_id]


# -- the HTTP side ---------------------------------------------------------------------------------------------------
async def start(state: ServerState, job: ResponseJob) -> tuple[Pump, AsyncIterator[Any], Started]:
    """Start the turn's thread and wait until it is planned (errors before any output raise here)."""
    run = run_stored if job.store else run_unstored
    pump = Pump(lambda: run(state, job), asyncio.get_running_loop())
    items = pump.__aiter__()
    try:
        started = await items.__anext__()
    except StopAsyncIteration:
        raise APIError(500, "the turn ended before it started", type="server_error") from None
    except BaseException as exc:
        pump.stop()
        raise translate(exc) from None
    return pump, items, started


async def complete(state: ServerState, job: ResponseJob) -> dict[str, Any]:
    pump, items, _ = await start(state, job)
    done = None
    try:
        async for item in items:
            if isinstance(item, Done):
                done = item
    except Exception as exc:
        raise translate(exc) from None
    finally:
        pump.stop()
    if done is None:
        raise APIError(500, "the turn ended without a response", type="server_error")
    return done.response


def _event(kind: str, seq: int, **fields: Any) -> bytes:
    body = {"type": kind, "sequence_number": seq, **fields}
    return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


async def stream(state: ServerState, job: ResponseJob, pump: Pump, items: AsyncIterator[Any],
                 started: Started) -> AsyncIterator[bytes]:
    """Server-sent events: response.created, .in_progress, .output_item.added, .content_part.added,
    .output_text.delta..., .output_text.done, .content_part.done, .output_item.done, then one
    .output_item.added, .function_call_arguments.delta / .done, .output_item.done per parsed tool call, and
    .completed (or .incomplete / .failed). With tools the text is shown up to a tool-call marker; the rest comes
    once the reply is parsed. Closing the stream cancels the generation; a stored reply keeps its text, cancelled."""
    seq = 0

    def ev(kind: str, **fields: Any) -> bytes:
        nonlocal seq
        seq += 1
        return _event(kind, seq - 1, **fields)

    head = {"id": job.id, "object": "response", "created_at": int(job.created_at), "status": "in_progress",
            "model": job.model, "output": [], "previous_response_id": job.previous_id,
            "instructions": job.instructions, "usage": None, "error": None, "incomplete_details": None,
            "conversation": {"id": started.session_id} if started.session_id else None, "metadata": job.metadata,
            "tools": job.params.get("tools", []), "tool_choice": job.params.get("tool_choice", "auto"),
            "parallel_tool_calls": False, "truncation": job.params.get("truncation"), "store": job.store,
            "text": {"format": {"type": "text"}}}
    calls = CallStream(job.tools.names) if job.tools.names else None
    item_id: str | None = None
    text: list[str] = []
    lps: list[dict[str, Any]] = []   # logprob entries not sent yet (their text is held back)

    def delta(piece: str) -> bytes:
        nonlocal lps
        out, lps = lps, []
        return ev("response.output_text.delta", item_id=item_id, output_index=0, content_index=0, delta=piece,
                  logprobs=out)

    try:
        yield ev("response.created", response=head)
        yield ev("response.in_progress", response=head)
        try:
            async for item in items:
                if isinstance(item, Done):
                    final = item.response
                    out = final["output"]
                    msg = next((o for o in out if o["type"] == "message"), None)
                    if item_id is None and msg is not None:
                        item_id = msg["id"]
                        for b in _opening(ev, item_id):
                            yield b
                    if item_id is not None:
                        shown = "".join(text)
                        full = msg["content"][0]["text"] if msg is not None else shown
                        rest = full[len(shown):] if full.startswith(shown) else ""
                        if rest or lps:
                            yield delta(rest)
                        done_lps = msg["content"][0].get("logprobs", []) if msg is not None else []
                        part = {"type": "output_text", "text": full, "annotations": [], "logprobs": done_lps}
                        yield ev("response.output_text.done", item_id=item_id, output_index=0, content_index=0,
                                 text=full, logprobs=done_lps)
                        yield ev("response.content_part.done", item_id=item_id, output_index=0, content_index=0,
                                 part=part)
                        yield ev("response.output_item.done", output_index=0, item=msg)
                    for i, o in enumerate(out):
                        if o["type"] == "function_call":
                            for b in _call_events(ev, i, o):
                                yield b
                    kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
                        final["status"], "response.failed")
                    yield ev(kind, response=final)
                    continue
                lps += item.logprobs
                piece = calls.feed(item.text) if calls is not None else item.text
                if item_id is None and (piece or calls is None):   # with tools: opened on the first text shown
                    item_id = item.message_id or f"msg_{job.id[5:]}"
                    for b in _opening(ev, item_id):
                        yield b
                if piece:
                    text.append(piece)
                    yield delta(piece)
        except Exception as exc:  # after the headers: an error event in OpenAI's shape
            err = translate(exc)
            yield ev("error", code=err.code, message=err.message, param=err.param)
    finally:
        pump.stop()


def _opening(ev: Any, item_id: str) -> Iterator[bytes]:
    item = {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []}
    yield ev("response.output_item.added", output_index=0, item=item)
    yield ev("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
             part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})


def _call_events(ev: Any, index: int, call: dict[str, Any]) -> Iterator[bytes]:
    """One parsed tool call's events (its arguments in one delta: they are known whole only once parsed)."""
    yield ev("response.output_item.added", output_index=index, item={**call, "arguments": "", "status": "in_progress"})
    yield ev("response.function_call_arguments.delta", item_id=call["id"], output_index=index, delta=call["arguments"])
    yield ev("response.function_call_arguments.done", item_id=call["id"], output_index=index, name=call["name"],
             arguments=call["arguments"])
    yield ev("response.output_item.done", output_index=index, item=call)
