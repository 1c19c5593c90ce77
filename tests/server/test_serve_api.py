"""`chatcore serve` through the official openai client against a real server process (one per module)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from _server_helpers import Reply, ServerProcess, request, wait_for

pytestmark = pytest.mark.redis

KEY = "test-key"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(tiny_model: Any, redis_shared: Any) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_model, redis_shared.env, "--api-key", KEY).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def store(redis_shared: Any) -> Any:
    return redis_shared.store


def _raw(server: ServerProcess, method: str, path: str, *, key: str | None = KEY, **kw: Any) -> Reply:
    return request(server.url + path, method, key=key, **kw)


def _error_shape(r: Reply, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


# -- models, auth, errors ------------------------------------------------------------------------------------
def test_models_lists_the_served_name(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_requests_without_the_key_get_401(server: ServerProcess) -> None:
    _error_shape(_raw(server, "GET", "/models", key=None), 401, "invalid_api_key")
    _error_shape(_raw(server, "GET", "/models", key="wrong"), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()


def test_errors_have_openai_shape(server: ServerProcess, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO, max_tokens=2)
    _error_shape(_raw(server, "POST", "/chat/completions", json={"model": "nope", "messages": HELLO}), 404,
                 "model_not_found", "model")
    err = _error_shape(_raw(server, "POST", "/chat/completions", json={"model": "tiny", "messages": "hi"}), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == "messages"
    _error_shape(_raw(server, "POST", "/chat/completions", content=b"{not json"), 400)
    _error_shape(_raw(server, "POST", "/chat/completions", json={"messages": HELLO, "temperature": -1}), 400,
                 param="temperature")
    _error_shape(_raw(server, "GET", "/no/such/route"), 404)
    _error_shape(_raw(server, "GET", "/responses/resp_nothing"), 404)
    # 600 byte-level tokens do not fit the 512-token window
    long = [{"role": "user", "content": "x" * 600}]
    _error_shape(_raw(server, "POST", "/chat/completions", json={"messages": long}), 400, "context_length_exceeded")
    _error_shape(_raw(server, "POST", "/chat/completions", json={"messages": HELLO, "top_logprobs": 2}), 400,
                 param="top_logprobs")   # without logprobs: true, as OpenAI
    _error_shape(_raw(server, "POST", "/chat/completions", json={"messages": HELLO, "top_logprobs": 21,
                                                                 "logprobs": True}), 400, param="top_logprobs")
    _error_shape(_raw(server, "POST", "/chat/completions", json={"messages": HELLO, "tool_choice": "required"}), 400,
                 param="tool_choice")   # no tools to require
    tool = {"type": "function", "function": {"name": "f"}}
    _error_shape(_raw(server, "POST", "/chat/completions", json={
        "messages": HELLO, "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}}), 400,
        param="tool_choice")
    _error_shape(_raw(server, "POST", "/chat/completions", json={"messages": HELLO, "tools": [{"type": "web"}]}),
                 400, param="tools[0]")


# -- chat completions ------------------------------------------------------------------------------------------
def test_chat_completion_usage_and_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0, logprobs=True)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert r.usage.completion_tokens == 5
    # ChatML around "hello": "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n" = 3 specials + 21 bytes
    assert r.usage.prompt_tokens == 24
    assert r.usage.total_tokens == 29
    assert len(choice.logprobs.content) == 5
    assert all(lp.logprob <= 0 for lp in choice.logprobs.content)
    # max_completion_tokens is the newer name of the same limit
    r2 = client.chat.completions.create(model="tiny", messages=HELLO, max_completion_tokens=3, temperature=0)
    assert r2.usage.completion_tokens == 3
    assert r.choices[0].message.content.startswith(r2.choices[0].message.content)


def test_top_logprobs_in_openai_shape(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    text = ""
    for lp in content:
        assert len(lp.top_logprobs) == 3 and lp.logprob <= 0
        assert [t.logprob for t in lp.top_logprobs] == sorted((t.logprob for t in lp.top_logprobs), reverse=True)
        assert lp.top_logprobs[0].token == lp.token and lp.top_logprobs[0].logprob == pytest.approx(lp.logprob)
        assert all(t.bytes == list(t.token.encode()) for t in [lp, *lp.top_logprobs])
        text += lp.token
    # greedy tokens are those without top_logprobs; the chosen token is the top-1 (greedy)
    plain = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == plain.choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [(lp.token, lp.logprob, [t.token for t in lp.top_logprobs]) for lp in streamed] == \
        [(lp.token, lp.logprob, [t.token for t in lp.top_logprobs]) for lp in content]
    hot = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=1.0, seed=3,
                                         logprobs=True, top_logprobs=20)
    for lp in hot.choices[0].logprobs.content:   # sampled: maybe not the top-1, never likelier than it
        assert len(lp.top_logprobs) == 20 and lp.logprob <= lp.top_logprobs[0].logprob + 1e-6


def test_responses_output_text_logprobs(client: openai.OpenAI) -> None:
    r = client.responses.create(model="tiny", input="logprobs please", max_output_tokens=4, temperature=0,
                                include=["message.output_text.logprobs"], top_logprobs=2)
    part = r.output[0].content[0]
    assert len(part.logprobs) == 4 and "".join(lp.token for lp in part.logprobs) == part.text
    assert all(len(lp.top_logprobs) == 2 and lp.top_logprobs[0].logprob == pytest.approx(lp.logprob)
               for lp in part.logprobs)
    events = list(client.responses.create(model="tiny", input="logprobs please", max_output_tokens=4, temperature=0,
                                          include=["message.output_text.logprobs"], top_logprobs=2, stream=True))
    deltas = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [lp.token for lp in deltas] == [lp.token for lp in part.logprobs]
    unstored = client.responses.create(model="tiny", input="logprobs please", max_output_tokens=4, temperature=0,
                                       include=["message.output_text.logprobs"], store=False)
    assert [lp.token for lp in unstored.output[0].content[0].logprobs] == [lp.token for lp in part.logprobs]
    assert client.responses.create(model="tiny", input="none", max_output_tokens=2).output[0].content[0].logprobs \
        == []


def test_streaming_equals_non_streaming_and_reports_usage(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    plain = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, stream=True))
    assert all(c.usage is None for c in plain)


def test_seed_makes_sampling_repeat(client: openai.OpenAI) -> None:
    def run(seed: int) -> str:
        r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=1.5, seed=seed)
        return r.choices[0].message.content
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_string_ends_the_reply(client: openai.OpenAI) -> None:
    text = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0) \
        .choices[0].message.content
    at = next(i for i in range(2, len(text)) if text[i] not in "\ufffd")
    stop = text[at]
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_n_choices_are_the_seeded_single_runs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=1.0, seed=11, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    for i, c in enumerate(r.choices):
        one = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=1.0,
                                             seed=11 + i)
        assert c.message.content == one.choices[0].message.content
    streamed = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=1.0,
                                                   seed=11, n=3, stream=True))
    for i, c in enumerate(r.choices):
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed
                       if ch.choices and ch.choices[0].index == i) == c.message.content


def test_tools_reach_the_chat_template(client: openai.OpenAI) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                             "parameters": {"type": "object", "properties": {}}}}
    plain = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1)
    tooled = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1, tools=[tool])
    rendered = json.dumps([tool], ensure_ascii=False)
    # the template adds "<|im_start|>system\nTools: " + tools + "<|im_end|>\n": 2 specials + 15 bytes + the JSON
    assert tooled.usage.prompt_tokens - plain.usage.prompt_tokens == 2 + 15 + len(rendered.encode())


# -- responses ----------------------------------------------------------------------------------------------------
def _thread(store: Any, sid: str) -> list[Any]:
    return store.thread(sid)


def test_previous_response_id_chain_is_one_session(client: openai.OpenAI, store: Any) -> None:
    r1 = client.responses.create(model="tiny", input="first", max_output_tokens=4, instructions="Be brief.")
    r2 = client.responses.create(model="tiny", input="second", previous_response_id=r1.id, max_output_tokens=4)
    r3 = client.responses.create(model="tiny", input=[{"role": "user", "content": "third"}],
                                 previous_response_id=r2.id, max_output_tokens=4)
    sid = r1.conversation.id
    assert r2.conversation.id == sid == r3.conversation.id
    thread = _thread(store, sid)
    assert [m.role for m in thread] == ["user", "assistant"] * 3
    assert [m.content for m in thread[0::2]] == ["first", "second", "third"]
    assert [m.id for m in thread[1::2]] == [r1.output[0].id, r2.output[0].id, r3.output[0].id]
    assert thread[-1].content == r3.output_text
    assert store.get_session(sid).system_prompt == "Be brief."
    assert r3.usage.output_tokens == 4 and r3.status == "incomplete"
    assert r3.usage.input_tokens_details.cached_tokens > 0   # the session's KV prefix was kept from r2
    got = client.responses.retrieve(r2.id)
    assert got.output_text == r2.output_text and got.previous_response_id == r1.id
    assert [i.content[0].text for i in client.responses.input_items.list(r3.id).data] == ["third"]


def test_previous_response_id_to_an_older_response_branches(client: openai.OpenAI, store: Any) -> None:
    r1 = client.responses.create(model="tiny", input="root", max_output_tokens=3)
    r2 = client.responses.create(model="tiny", input="one way", previous_response_id=r1.id, max_output_tokens=3)
    r2b = client.responses.create(model="tiny", input="other way", previous_response_id=r1.id, max_output_tokens=3)
    sid = r1.conversation.id
    conv = store.load(sid)
    assert len(conv.messages) == 6
    assert [m.content for m in conv.children(r1.output[0].id)] == ["one way", "other way"]
    assert [m.content for m in conv.thread()][0::2] == ["root", "other way"]   # the tip follows the newest
    r3 = client.responses.create(model="tiny", input="back", previous_response_id=r2.id, max_output_tokens=3)
    assert [m.content for m in store.load(sid).thread()][0::2] == ["root", "one way", "back"]
    assert r2b.output[0].id in store.load(sid).by_id and r3.status == "incomplete"


def test_streaming_response_events(client: openai.OpenAI, store: Any) -> None:
    events = list(client.responses.create(model="tiny", input="stream", max_output_tokens=5, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == store.get_message(final.conversation.id, final.output[0].id).content
    assert final.usage.output_tokens == 5


def test_store_false_keeps_nothing(client: openai.OpenAI, store: Any) -> None:
    before = store.count_sessions()
    r = client.responses.create(model="tiny", input="ephemeral", max_output_tokens=3, store=False)
    assert r.output_text is not None and r.usage.output_tokens == 3
    assert store.count_sessions() == before
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    # on top of a stored conversation: its history is read, nothing is added to it
    base = client.responses.create(model="tiny", input="kept", max_output_tokens=3)
    messages = len(store.load(base.conversation.id).messages)
    fresh = client.responses.create(model="tiny", input="peek", max_output_tokens=2, store=False)
    peek = client.responses.create(model="tiny", input="peek", max_output_tokens=2, store=False,
                                   previous_response_id=base.id)
    assert peek.usage.input_tokens > fresh.usage.input_tokens
    assert len(store.load(base.conversation.id).messages) == messages


def test_delete_response_keeps_the_conversation(client: openai.OpenAI, store: Any) -> None:
    r = client.responses.create(model="tiny", input="to delete", max_output_tokens=2)
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", input="x", previous_response_id=r.id, max_output_tokens=2)
    assert len(store.thread(r.conversation.id)) == 2


def test_truncation_disabled_refuses_auto_drops_old_turns(client: openai.OpenAI, store: Any, server: Any) -> None:
    turns = []
    for i in range(4):   # four turns of ~140 tokens: more than the 511-token prompt budget
        turns += [{"role": "user", "content": f"q{i} " + "a" * 120}, {"role": "assistant", "content": "b" * 120}]
    conv = client.conversations.create(items=turns)
    before = len(store.thread(conv.id))
    r = _raw(server, "POST", "/responses", json={"model": "tiny", "input": "next", "conversation": conv.id,
                                                  "truncation": "disabled", "max_output_tokens": 2})
    _error_shape(r, 400, "context_length_exceeded")
    assert len(store.thread(conv.id)) == before                      # nothing stored
    ok = client.responses.create(model="tiny", input="next", conversation=conv.id, truncation="auto",
                                 max_output_tokens=2)
    assert ok.usage.input_tokens <= 256                               # the auto budget: half the window
    assert [m.content for m in store.thread(conv.id)][-2] == "next"


def test_concurrent_requests_on_one_conversation_conflict(client: openai.OpenAI, server: Any, store: Any) -> None:
    first = client.responses.create(model="tiny", input="busy", max_output_tokens=2)
    stream = client.responses.create(model="tiny", input="long", previous_response_id=first.id,
                                     max_output_tokens=480, stream=True)
    for ev in stream:
        if ev.type == "response.output_text.delta":
            break
    r = _raw(server, "POST", "/responses", json={"input": "meanwhile", "previous_response_id": first.id,
                                                  "max_output_tokens": 2})
    _error_shape(r, 409, "conversation_busy")
    stream.close()


def test_closing_the_stream_cancels_and_keeps_the_partial_reply(client: openai.OpenAI, store: Any) -> None:
    stream = client.responses.create(model="tiny", input="cancel me", max_output_tokens=480, stream=True)
    rid = sid = None
    deltas = 0
    for ev in stream:
        if ev.type == "response.created":
            rid, sid = ev.response.id, ev.response.conversation.id
        if ev.type == "response.output_text.delta":
            deltas += 1
            if deltas == 3:
                break
    live = client.responses.retrieve(rid)   # readable while it streams
    assert live.status == "in_progress" and live.output[0].role == "assistant"
    stream.close()

    def cancelled() -> Any:
        m = store.thread(sid)[-1]
        return m if m.role == "assistant" and m.status == "cancelled" else None
    reply = wait_for(cancelled)
    assert 3 <= reply.tokens < 480
    rec = wait_for(lambda: _stored(client, rid))
    assert rec.status == "cancelled" and rec.output[0].id == reply.id


def _stored(client: openai.OpenAI, rid: str) -> Any:
    try:
        return client.responses.retrieve(rid)
    except openai.NotFoundError:
        return None


def test_concurrent_clients(client: openai.OpenAI, store: Any) -> None:
    results: dict[int, list[Any]] = {}
    errors: list[BaseException] = []

    def chat(i: int) -> None:
        try:
            r1 = client.responses.create(model="tiny", input=f"client {i}", max_output_tokens=3)
            r2 = client.responses.create(model="tiny", input="again", previous_response_id=r1.id,
                                         max_output_tokens=3)
            c = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=0)
            results[i] = [r1, r2, c]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=chat, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 4
    assert len({r[2].choices[0].message.content for r in results.values()}) == 1   # greedy: the same reply
    for i, (r1, r2, _) in results.items():
        thread = store.thread(r1.conversation.id)
        assert [m.content for m in thread][0::2] == [f"client {i}", "again"]
        assert all(m.status == "complete" for m in thread[0::2])
        assert thread[-1].id == r2.output[0].id


# -- conversations --------------------------------------------------------------------------------------------------
def test_conversation_over_http_is_a_session(client: openai.OpenAI, store: Any) -> None:
    conv = client.conversations.create(items=[{"type": "message", "role": "user", "content": "hi there"}],
                                       metadata={"title": "From HTTP"})
    session = store.get_session(conv.id)
    assert session.title == "From HTTP" and conv.metadata == {"title": "From HTTP"}
    r = client.responses.create(model="tiny", input="and now?", conversation=conv.id, max_output_tokens=3)
    # a user message under a user message is an edit in chatcore's sessions: the two are joined into one
    assert [(m.role, m.content) for m in store.thread(conv.id)] == [
        ("user", "hi there\n\nand now?"), ("assistant", r.output_text)]
    assert [m.content for m in store.load(conv.id).messages] == ["hi there", "hi there\n\nand now?", r.output_text]
    from context import SessionLibrary  # what `chatcore chat` lists and shows

    shown = SessionLibrary(store).messages(conv.id)
    assert [(m.role, m.content) for m in shown] == [(m.role, m.content) for m in store.thread(conv.id)]
    assert SessionLibrary(store).get(conv.id).title == "From HTTP"
    items = client.conversations.items.list(conv.id, order="asc").data
    assert [i.id for i in items] == [m.id for m in store.thread(conv.id)]
    client.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "added"}])
    assert store.thread(conv.id)[-1].content == "added"
    client.conversations.delete(conv.id)
    assert not store.session_exists(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)


def test_session_made_elsewhere_continues_over_http(client: openai.OpenAI, store: Any) -> None:
    s = store.create_session("From the TUI", system_prompt="You are terse.")
    u = store.append_message(s.id, "user", "made in the TUI")
    store.append_message(s.id, "assistant", "a reply", parent_id=u.id)
    assert client.conversations.retrieve(s.id).metadata == {"title": "From the TUI"}
    r = client.responses.create(model="tiny", input="continued over HTTP", conversation=s.id, max_output_tokens=3)
    thread = store.thread(s.id)
    assert [m.content for m in thread] == ["made in the TUI", "a reply", "continued over HTTP", r.output_text]
    # the prompt held the whole session: the system prompt, both stored messages and the new one
    assert r.usage.input_tokens > len("You are terse.made in the TUIa replycontinued over HTTP")
