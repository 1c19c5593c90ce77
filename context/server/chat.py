"""`POST /v1/chat/completions`: stateless; the messages rendered with the model's chat template (tools too), one
engine generation per choice (n > 1: n generations at once, batched by a BatchEngine)."""

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
from .pump import Pump, merged
from .sampling import check, sampling_fields
from .schemas import ChatCompletionRequest
from .state import ServerState


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    finish: str | None = None
    stats: Any = None


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


def prepare(state: ServerState, req: ChatCompletionRequest) -> ChatJob:
    """Check and render the request (a 400 / 404 in OpenAI's shape for what cannot run)."""
    model = state.check_model(req.model)
    if req.n > state.config.max_n:
        raise bad_request(f"n must be at most {state.config.max_n}", "n")
    if req.top_logprobs:
        raise bad_request("top_logprobs is not supported: chatcore reports the chosen token's logprob only "
                          "(logprobs: true)", "top_logprobs")
    messages = [chat_message(m, i) for i, m in enumerate(req.messages)]
    extra: dict[str, Any] = {"tools": req.tools} if req.tools else {}
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
    base = sampling_fields(req, max_tokens=min(wanted or room, room), stop=req.stop, logprobs=req.logprobs)
    params = []
    for i in range(req.n):
        f = dict(base)
        if req.seed is not None:
            f["seed"] = req.seed + i
        params.append(check(f))
    include = bool(req.stream_options and req.stream_options.include_usage)
    return ChatJob("chatcmpl-" + _hex(), int(time.time()), model, ids, params, req.logprobs, req.stream, include)


def _hex() -> str:
    import secrets

    return secrets.token_hex(12)


def _start(state: ServerState, job: ChatJob, loop: asyncio.AbstractEventLoop) -> tuple[list[Pump], asyncio.Queue]:
    queue: asyncio.Queue[Any] = asyncio.Queue()
    engine = state.engine
    pumps = [Pump(lambda p=p: engine.generate(job.ids, p), loop, tag=i, queue=queue) for i, p in enumerate(job.params)]
    return pumps, queue


def _logprob(state: ServerState, ev: Any) -> dict[str, Any]:
    token = state.tokenizer.decode([ev.token_id])
    return {"token": token, "logprob": ev.logprob, "bytes": list(token.encode("utf-8")), "top_logprobs": []}


def _take(state: ServerState, job: ChatJob, c: _Choice, ev: Any) -> tuple[str, list[dict[str, Any]]]:
    """Count one engine event into the choice; the text and logprob entries it adds."""
    lps: list[dict[str, Any]] = []
    if ev.finish_reason is None:
        c.tokens += 1
        if job.logprobs and ev.logprob is not None:
            lps.append(_logprob(state, ev))
    else:
        c.finish, c.stats = ev.finish_reason, ev.stats
        if ev.stats is not None and ev.stats.generated_tokens > c.tokens:   # the last token is part of the reply
            c.tokens += 1
            if job.logprobs and ev.logprob is not None:
                lps.append(_logprob(state, ev))
    c.text.append(ev.text)
    c.logprobs.extend(lps)
    return ev.text, lps


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
        choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": "".join(c.text)},
                                  "finish_reason": _finish(c.finish),
                                  "logprobs": {"content": c.logprobs} if job.logprobs else None}
        out.append(choice)
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model, "choices": out,
            "usage": _usage(choices), "system_fingerprint": None}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


async def stream(state: ServerState, job: ChatJob) -> AsyncIterator[bytes]:
    """Server-sent chunks; the generations stop when the client goes away (the iterator is closed)."""
    pumps, queue = _start(state, job, asyncio.get_running_loop())
    choices = [_Choice() for _ in job.params]

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
                text, lps = _take(state, job, choices[i], ev)
                if text or lps:
                    yield chunk(i, {"content": text}, lps=lps)
                if ev.finish_reason is not None:
                    yield chunk(i, {}, _finish(ev.finish_reason))
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
