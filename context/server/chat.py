"""`POST /v1/chat/completions`: stateless; the messages rendered with the model's chat template (tools too), one
engine generation per choice (n > 1: n generations at once, batched by a BatchEngine). With tools, each choice's
output is parsed for tool calls (context/server/tool_calls.py): `message.tool_calls`, or in a stream the text up to
a tool-call marker and then `delta.tool_calls` at the end; finish_reason "tool_calls"."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from chatcore.errors import ChatcoreError

from .errors import APIError, bad_request, too_long, translate
from .items import chat_message
from .logprobs import token_logprob
from .pump import Pump, merged
from .sampling import check, sampling_fields
from .schemas import ChatCompletionRequest
from .state import ServerState
from .tool_calls import CallStream, parse
from .tool_output import chat_tool_calls, delta_tool_calls, tool_use


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    finish: str | None = None
    stats: Any = None
    calls: CallStream | None = None   # with tools: the text shown so far, the calls parsed at the end


@dataclass(frozen=True)
class ChatJob:
    id: str
    created: int
    model: str
    ids: list[int]
    params: list[Any]   # one SamplingParams per choice
    logprobs: bool
    stream: bool
    include_usage: bool
    top_logprobs: int = 0
    tool_names: frozenset[str] = frozenset()   # functions whose calls are parsed from the output (none: text)


def prepare(state: ServerState, req: ChatCompletionRequest) -> ChatJob:
    """Check and render the request (a 400 / 404 in OpenAI's shape for what cannot run)."""
    model = state.check_model(req.model)
    if req.n > state.config.max_n:
        raise bad_request(f"n must be at most {state.config.max_n}", "n")
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    tools = tool_use(req.tools, req.tool_choice)
    messages = [chat_message(m, i) for i, m in enumerate(req.messages)]
    extra: dict[str, Any] = {"tools": tools.template} if tools.template else {}
    try:
        ids = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
    except ChatcoreError as exc:
        raise bad_request(str(exc), "messages") from None
    window = state.engine.window
    if len(ids) >= window:
        raise too_long(f"the messages take {len(ids)} tokens but the context window is {window} (one more is "
                       "needed for the reply); shorten them", "messages")
    wanted = req.max_completion_tokens or req.max_tokens
    room = window - len(ids)
    base = sampling_fields(req, max_tokens=min(wanted or room, room), stop=req.stop, logprobs=req.logprobs,
                           top_logprobs=top)
    params = []
    for i in range(req.n):
        f = dict(base)
        if req.seed is not None:
            f["seed"] = req.seed + i
        params.append(check(f))
    include = bool(req.stream_options and req.stream_options.include_usage)
    return ChatJob("chatcmpl-" + _hex(), int(time.time()), model, ids, params, req.logprobs, req.stream, include,
                   top, tools.names)


def _hex() -> str:
    import secrets

    return secrets.token_hex(12)


def _start(state: ServerState, job: ChatJob, loop: asyncio.AbstractEventLoop) -> tuple[list[Pump], asyncio.Queue]:
    queue: asyncio.Queue[Any] = asyncio.Queue()
    engine = state.engine
    pumps = [Pump(lambda p=p: engine.generate(job.ids, p), loop, tag=i, queue=queue) for i, p in enumerate(job.params)]
    return pumps, queue


def _logprob(state: ServerState, job: ChatJob, ev: Any) -> dict[str, Any]:
    return token_logprob(state.token_texts, ev, job.top_logprobs)


def _take(state: ServerState, job: ChatJob, c: _Choice, ev: Any) -> tuple[str, list[dict[str, Any]]]:
    """Count one engine event into the choice; the text to show now and the logprob entries it adds."""
    lps: list[dict[str, Any]] = []
    if ev.finish_reason is None:
        c.tokens += 1
        if job.logprobs and ev.logprob is not None:
            lps.append(_logprob(state, job, ev))
    else:
        c.finish, c.stats = ev.finish_reason, ev.stats
        if ev.stats is not None and ev.stats.generated_tokens > c.tokens:   # the last token is part of the reply
            c.tokens += 1
            if job.logprobs and ev.logprob is not None:
                lps.append(_logprob(state, job, ev))
    c.text.append(ev.text)
    c.logprobs.extend(lps)
    shown = c.calls.feed(ev.text) if c.calls is not None else ev.text
    return shown, lps


def _message(job: ChatJob, c: _Choice) -> tuple[dict[str, Any], str]:
    """The choice's message (content and parsed tool calls) and finish_reason."""
    text = "".join(c.text)
    finish = _finish(c.finish)
    parsed = parse(text, job.tool_names) if job.tool_names else None
    if parsed is None or not parsed.calls:
        return {"role": "assistant", "content": text}, finish
    message = {"role": "assistant", "content": parsed.content or None, "tool_calls": chat_tool_calls(parsed.calls)}
    return message, "tool_calls" if finish == "stop" else finish


def _usage(choices: list[_Choice]) -> dict[str, Any]:
    stats = [c.stats for c in choices if c.stats is not None]
    prompt = stats[0].prompt_tokens if stats else 0
    cached = max((s.cached_tokens for s in stats), default=0)
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


async def complete(state: ServerState, job: ChatJob) -> dict[str, Any]:
    """The whole completion (non-streaming)."""
    pumps, queue = _start(state, job, asyncio.get_running_loop())
    choices = [_Choice() for _ in job.params]
    try:
        async for i, ev in merged(pumps, queue):
            _take(state, job, choices[i], ev)
    except APIError:
        raise
    except Exception as exc:
        raise translate(exc) from None
    finally:
        for p in pumps:
            p.stop()
    out = []
    for i, c in enumerate(choices):
        message, finish = _message(job, c)
        out.append({"index": i, "message": message, "finish_reason": finish,
                    "logprobs": {"content": c.logprobs} if job.logprobs else None})
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model, "choices": out,
            "usage": _usage(choices), "system_fingerprint": None}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


async def stream(state: ServerState, job: ChatJob) -> AsyncIterator[bytes]:
    """Server-sent chunks; the generations stop when the client goes away (the iterator is closed)."""
    pumps, queue = _start(state, job, asyncio.get_running_loop())
    choices = [_Choice(calls=CallStream(job.tool_names) if job.tool_names else None) for _ in job.params]

    def chunk(i: int, delta: dict[str, Any], finish: str | None = None, lps: list | None = None) -> bytes:
        c = {"index": i, "delta": delta, "finish_reason": finish,
             "logprobs": {"content": lps} if job.logprobs and lps is not None else None}
        body = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
                "choices": [c], "system_fingerprint": None}
        if job.include_usage:
            body["usage"] = None
        return _sse(body)

    try:
        for i in range(len(choices)):
            yield chunk(i, {"role": "assistant", "content": ""})
        try:
            async for i, ev in merged(pumps, queue):
                c = choices[i]
                text, lps = _take(state, job, c, ev)
                if text or lps:
                    yield chunk(i, {"content": text}, lps=lps)
                if ev.finish_reason is None:
                    continue
                finish = _finish(ev.finish_reason)
                if c.calls is not None:   # the held text and the parsed calls
                    parsed, rest = c.calls.finish()
                    if rest:
                        yield chunk(i, {"content": rest})
                    if parsed.calls:
                        yield chunk(i, {"tool_calls": delta_tool_calls(chat_tool_calls(parsed.calls))})
                        finish = "tool_calls" if finish == "stop" else finish
                yield chunk(i, {}, finish)
        except Exception as exc:  # after the headers: the error goes in the stream, in OpenAI's shape
            yield _sse(translate(exc).body())
            return
        if job.include_usage:
            yield _sse({"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
                        "choices": [], "usage": _usage(choices)})
        yield b"data: [DONE]\n\n"
    finally:
        for p in pumps:
            p.stop()
