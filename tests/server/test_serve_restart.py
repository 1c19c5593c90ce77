"""Conversations live in Redis, not in a server: a `previous_response_id` chain survives a restart, and two
server processes on one Redis continue each other's conversations."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from _server_helpers import ServerProcess

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def pair(tiny_model: Any, redis_shared: Any) -> Iterator[list[ServerProcess]]:
    procs = [ServerProcess(tiny_model, redis_shared.env).start(), ServerProcess(tiny_model, redis_shared.env).start()]
    yield procs
    for p in procs:
        p.stop()


def _client(proc: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.url, api_key="unused", max_retries=0, timeout=60)


def test_two_servers_restart_and_continue_each_others_conversations(pair: list[ServerProcess],
                                                                     redis_shared: Any) -> None:
    a, b = pair
    r1 = _client(a).responses.create(model="tiny", input="on a", max_output_tokens=3, temperature=0)
    r2 = _client(b).responses.create(model="tiny", input="on b", previous_response_id=r1.id, max_output_tokens=3,
                                     temperature=0)
    r3 = _client(a).responses.create(model="tiny", input="on a again", previous_response_id=r2.id,
                                     max_output_tokens=3, temperature=0)
    assert _client(a).responses.retrieve(r2.id).output_text == r2.output_text
    assert _client(b).conversations.retrieve(r1.conversation.id).id == r1.conversation.id

    a.stop()
    a.start()   # a fresh process: nothing in memory
    r4 = _client(a).responses.create(model="tiny", input="after the restart", previous_response_id=r3.id,
                                     max_output_tokens=3, temperature=0)
    assert _client(a).responses.retrieve(r1.id).output_text == r1.output_text

    store = redis_shared.store
    sid = r1.conversation.id
    assert r4.conversation.id == sid
    thread = store.thread(sid)
    assert [m.content for m in thread][0::2] == ["on a", "on b", "on a again", "after the restart"]
    assert [m.id for m in thread][1::2] == [r.output[0].id for r in (r1, r2, r3, r4)]
    assert all(m.status == "complete" for m in thread)

    # the same history on either server gives the same greedy reply (the conversation is all in Redis)
    again = _client(b).responses.create(model="tiny", input="after the restart", previous_response_id=r3.id,
                                        max_output_tokens=3, temperature=0)
    assert again.output_text == r4.output_text
    assert len(store.load(sid).children(r3.output[0].id)) == 2   # a second branch after r3


def test_auto_truncation_summarizes_with_summarize(tiny_model: Any, redis_shared: Any) -> None:
    proc = ServerProcess(tiny_model, redis_shared.env, "--summarize", "--summary-tokens", "16").start()
    try:
        client = _client(proc)
        turns = []
        for i in range(4):   # ~560 tokens of history: past the auto budget (256 of the 512-token window)
            turns += [{"role": "user", "content": f"q{i} " + "a" * 120}, {"role": "assistant", "content": "b" * 120}]
        conv = client.conversations.create(items=turns)
        r = client.responses.create(model="tiny", input="next", conversation=conv.id, truncation="auto",
                                    max_output_tokens=2)
    finally:
        proc.stop()
    session = redis_shared.store.get_session(conv.id)
    assert session.summary is not None and session.summary.text
    thread = redis_shared.store.thread(conv.id)
    assert session.summary.first_id == thread[0].id            # it covers the dropped turns, from the start
    assert r.usage.input_tokens <= 256
