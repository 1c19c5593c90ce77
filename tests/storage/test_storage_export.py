"""Export / import: our JSON round-trips exactly; Markdown reads well; ShareGPT and OpenAI JSONL import."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from storage import Conversation, InvalidInput, MessageTooLarge, Store, StoreConfig
from storage.export import FORMAT, from_json, import_text, parse_text, to_json, to_json_text, to_markdown

pytestmark = pytest.mark.redis


def rich_session(store: Store) -> str:
    s = store.create_session("Ünïcode & \"quotes\"", model="smollm2-135m", system_prompt="Be\nbrief.",
                             sampling={"temperature": 0.7, "top_p": 0.9, "seed": 1, "stop": ["</s>"]},
                             tags=["demo", "ß"])
    u = store.append_message(s.id, "user", "Hello 👋 — what's 2+2?\n\"quoted\" \\ back\\slash")
    store.delete_message(s.id, store.append_message(s.id, "assistant", "oops").id)  # a gap in seq
    a = store.append_message(s.id, "assistant", "", extra={"tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\":2,\"b\":2}"}}]})
    store.append_message(s.id, "tool", "4", extra={"tool_call_id": "call_1", "name": "add"})
    store.append_message(s.id, "assistant", "It is 4.", tokens=4)
    with store.regenerate(s.id, a.id) as w:
        w.write("Four.")
    store.begin_reply(s.id, parent_id=u.id).cancel()
    failed = store.begin_reply(s.id, parent_id=u.id)
    failed.write("half a")
    failed.fail()
    e = store.edit_message(s.id, u.id, "Hello, what's 3+3?")
    store.append_message(s.id, "assistant", "6", parent_id=e.id)
    store.set_tip(s.id, w.id)
    store.pin(s.id, u.id)
    store.set_summary(s.id, "Greetings and arithmetic.", u.id, w.id, tokens=6)
    store.set_token_counts(s.id, {u.id: 12})
    return s.id


def test_json_round_trip_is_exact(store: Store) -> None:
    sid = rich_session(store)
    before = store.load(sid)
    text = to_json_text(before)
    doc = json.loads(text)
    assert doc["format"] == FORMAT and doc["messages"][0]["role"] == "user"
    assert doc["messages"][1]["tool_calls"][0]["function"]["name"] == "add"  # OpenAI-style fields at top level

    store.delete_session(sid)
    imported = import_text(store, text)
    assert [s.id for s in imported] == [sid]
    after = store.load(sid)
    assert 1 not in [m.seq for m in before.messages]  # the gap survives too
    assert after == before  # every field of the session and of every message, all branches
    assert to_json_text(after) == text
    assert store.append_message(sid, "user", "next").seq == max(m.seq for m in before.messages) + 1
    store.delete_message(sid, store.get_session(sid).tip_id)

    again = store.import_conversation(from_json(doc))  # the id is taken now: imported under a new one
    assert again.id != sid
    copy = store.load(again.id)
    assert replace(copy.session, id=sid) == before.session
    assert [replace(m, session_id=sid) for m in copy.messages] == list(before.messages)


def test_streaming_reply_exports_and_imports_as_incomplete(backend) -> None:
    store = backend.store(StoreConfig(stale_after=60))
    s = store.create_session()
    w = store.begin_reply(s.id)
    w.write("unfinished")
    w.checkpoint()
    conv = store.load(s.id)
    assert conv.messages[0].status == "streaming"
    store.delete_session(s.id)
    store.import_conversation(conv)
    assert store.load(s.id).messages[0].status == "incomplete"


def test_markdown_shows_the_current_branch(store: Store) -> None:
    sid = rich_session(store)
    md = to_markdown(store.load(sid))
    assert md.startswith('# Ünïcode & "quotes"\n')
    assert "## System prompt\n\nBe\nbrief." in md
    assert "## Summary of earlier turns\n\nGreetings and arithmetic." in md
    assert "## User (version 1 of 2, pinned)" in md
    assert "## Assistant (version 2 of 4)\n\nFour." in md
    assert "It is 4." not in md and "3+3" not in md  # other branches are not in the Markdown


SHAREGPT = {"id": "abc", "conversations": [
    {"from": "system", "value": "You are a pirate."},
    {"from": "human", "value": "Hi there\nsecond line"},
    {"from": "gpt", "value": "Arr!"},
    {"from": "human", "value": "Bye"},
    {"from": "gpt", "value": "Farewell."}]}
OPENAI = {"model": "gpt-x", "temperature": 0.2, "messages": [
    {"role": "developer", "content": "Answer in French."},
    {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                          "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    {"role": "assistant", "content": "Bonjour le monde"}]}


def test_import_sharegpt_and_openai_jsonl(store: Store) -> None:
    data = json.dumps(SHAREGPT) + "\n\n" + json.dumps(OPENAI) + "\n"
    a, b = import_text(store, data, "chats.jsonl")
    ca, cb = store.load(a.id), store.load(b.id)
    assert ca.session.system_prompt == "You are a pirate." and ca.session.title == "Hi there"
    assert [(m.role, m.content) for m in ca.thread()] == [
        ("user", "Hi there\nsecond line"), ("assistant", "Arr!"), ("user", "Bye"), ("assistant", "Farewell.")]
    assert cb.session.system_prompt == "Answer in French." and cb.session.model == "gpt-x"
    assert cb.session.sampling == {"temperature": 0.2}
    thread = cb.thread()
    assert [m.role for m in thread] == ["user", "assistant", "tool", "assistant"]
    assert thread[0].content == "Hello world" and thread[1].extra["tool_calls"][0]["id"] == "c1"
    assert thread[2].extra == {"tool_call_id": "c1"}
    assert [s.id for s in store.list_sessions().sessions] == [b.id, a.id]


@pytest.mark.parametrize("bad, match", [
    ('{"conversations": [{"from": "alien", "value": "x"}]}', r"chats.jsonl:2: turn 1 comes 'from' 'alien'"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', r":2: .*'image_url' content part"),
    ('{"conversations": [', r"chats.jsonl:2: not valid JSON"),
    ('{"neither": 1}', r":2: not a chatcore export, ShareGPT"),
    ('[1, 2]', r":2: expected a JSON object"),
])
def test_a_bad_line_imports_nothing(store: Store, bad: str, match: str) -> None:
    data = json.dumps(SHAREGPT) + "\n" + bad + "\n"
    with pytest.raises(InvalidInput, match=match):
        import_text(store, data, "chats.jsonl")
    assert store.count_sessions() == 0


def test_import_refuses_broken_structure_and_oversize(backend) -> None:
    store = backend.store(StoreConfig(max_message_bytes=100))
    s = store.create_session()
    u = store.append_message(s.id, "user", "x")
    doc = to_json(store.load(s.id))
    store.delete_session(s.id)
    orphan = json.loads(json.dumps(doc))
    orphan["messages"][0]["parent_id"] = "elsewhere"
    with pytest.raises(InvalidInput, match="before its parent"):
        store.import_conversation(from_json(orphan))
    big = json.loads(json.dumps(doc))
    big["messages"][0]["content"] = "y" * 101
    with pytest.raises(MessageTooLarge):
        store.import_conversation(from_json(big))
    assert store.count_sessions() == 0
    assert isinstance(parse_text(json.dumps(doc))[0], Conversation)
    assert store.import_conversation(from_json(doc)).tip_id == u.id
    with pytest.raises(InvalidInput, match="empty"):
        parse_text("  \n")
