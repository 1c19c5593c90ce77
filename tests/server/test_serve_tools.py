"""Tool calls through a real `chatcore serve` process and the official openai client, on the scripted model
(`make_tool_model`: its greedy reply to every prompt is TOOL_SCRIPT, a Hermes tool call after some text)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from _server_helpers import TOOL_SCRIPT, ServerProcess, make_tool_model

pytestmark = pytest.mark.redis

HELLO = [{"role": "user", "content": "weather in Oslo?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
FLAT = {"type": "function", **WEATHER["function"]}   # the Responses API's shape of the same tool
OTHER = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
RAW = "".join(TOOL_SCRIPT)


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tool_model(tmp_path_factory.mktemp("tool-model"))


@pytest.fixture(scope="module")
def client(tool_model: Path, redis_shared: Any) -> Iterator[openai.OpenAI]:
    proc = ServerProcess(tool_model, redis_shared.env).start()
    yield openai.OpenAI(base_url=proc.url, api_key="none", max_retries=0, timeout=60)
    proc.stop()


def _chat(client: openai.OpenAI, **kw: Any) -> Any:
    return client.chat.completions.create(model="tiny", messages=kw.pop("messages", HELLO), max_tokens=16,
                                          temperature=0, **kw)


# -- chat completions ------------------------------------------------------------------------------------------------
def test_the_scripted_model_says_its_script(client: openai.OpenAI) -> None:
    r = _chat(client)
    assert r.choices[0].message.content == RAW and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.tool_calls is None


def test_chat_completion_tool_calls(client: openai.OpenAI) -> None:
    r = _chat(client, tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    assert r.usage.completion_tokens == len(TOOL_SCRIPT)
    for choice_ in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        assert _chat(client, tools=[WEATHER, OTHER], tool_choice=choice_).choices[0].finish_reason == "tool_calls"


def test_text_stays_text_without_a_matching_tool(client: openai.OpenAI) -> None:
    for kw in ({"tools": [WEATHER], "tool_choice": "none"}, {"tools": [OTHER]},
               {"tools": [WEATHER, OTHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}):
        choice = _chat(client, **kw).choices[0]
        assert choice.message.content == RAW and choice.message.tool_calls is None and choice.finish_reason == "stop"
    # tool_choice none: the tools do not reach the chat template either
    assert _chat(client, tools=[WEATHER], tool_choice="none").usage.prompt_tokens == _chat(client).usage.prompt_tokens


def test_streamed_tool_calls(client: openai.OpenAI) -> None:
    chunks = list(_chat(client, tools=[WEATHER], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "Let me check." and "<tool_call>" not in text
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Oslo"}
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    plain = list(_chat(client, tools=[WEATHER], tool_choice="none", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in plain) == RAW


def test_the_tool_result_goes_back_to_the_model(client: openai.OpenAI) -> None:
    first = _chat(client, tools=[WEATHER]).choices[0].message
    call = first.tool_calls[0]
    messages = [*HELLO, first.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp": -3}'}]
    again = _chat(client, messages=messages, tools=[WEATHER])
    assert again.choices[0].finish_reason == "tool_calls"   # the script again: the request worked
    assert again.usage.prompt_tokens > _chat(client, tools=[WEATHER]).usage.prompt_tokens + len('{"temp": -3}')


# -- responses -------------------------------------------------------------------------------------------------------
def test_response_function_call_items_and_the_tool_output_turn(client: openai.OpenAI, redis_shared: Any) -> None:
    r = client.responses.create(model="tiny", input="weather in Oslo?", tools=[FLAT], max_output_tokens=16,
                                temperature=0)
    assert [o.type for o in r.output] == ["message", "function_call"]
    assert r.output[0].content[0].text == "Let me check." and r.status == "completed"
    call = r.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    assert call.call_id.startswith("call_") and call.status == "completed"
    # the stored reply is the raw text; the call, and its id, are the same every time it is read
    store = redis_shared.store
    assert store.thread(r.conversation.id)[-1].content == RAW
    again = client.responses.retrieve(r.id)
    assert again.output[1].call_id == call.call_id and again.output[1].id == call.id
    nxt = client.responses.create(model="tiny", previous_response_id=r.id, tools=[FLAT], max_output_tokens=16,
                                  input=[{"type": "function_call_output", "call_id": call.call_id,
                                          "output": '{"temp": -3}'}])
    thread = store.thread(r.conversation.id)
    assert [m.role for m in thread] == ["user", "assistant", "tool", "assistant"]
    assert thread[2].extra["tool_call_id"] == call.call_id and thread[2].content == '{"temp": -3}'
    assert nxt.output[-1].type == "function_call" and nxt.usage.input_tokens > r.usage.input_tokens


def test_responses_render_the_tools_and_tool_choice_none(client: openai.OpenAI) -> None:
    plain = client.responses.create(model="tiny", input="hi", max_output_tokens=16, store=False)
    tooled = client.responses.create(model="tiny", input="hi", max_output_tokens=16, store=False, tools=[FLAT])
    rendered = json.dumps([WEATHER], ensure_ascii=False)
    # the template adds "<|im_start|>system\nTools: " + tools + "<|im_end|>\n": 2 specials + 15 bytes + the JSON
    assert tooled.usage.input_tokens - plain.usage.input_tokens == 2 + 15 + len(rendered.encode())
    assert plain.output_text == RAW and [o.type for o in tooled.output] == ["message", "function_call"]
    off = client.responses.create(model="tiny", input="hi", max_output_tokens=16, tools=[FLAT], tool_choice="none")
    assert [o.type for o in off.output] == ["message"] and off.output_text == RAW
    assert off.usage.input_tokens == plain.usage.input_tokens and off.tool_choice == "none"


def test_streamed_response_function_call_events(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="tiny", input="stream it", tools=[FLAT], max_output_tokens=16,
                                          stream=True))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Let me check."
    assert kinds[-5:] == ["response.output_item.added", "response.function_call_arguments.delta",
                          "response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"city": "Oslo"} and done.output_index == 1
    final = events[-1].response
    assert [o.type for o in final.output] == ["message", "function_call"]
    assert final.output[1].call_id == client.responses.retrieve(final.id).output[1].call_id
