"""The tool-call parser on many outputs, well formed, malformed and hostile, and its streaming side."""

from __future__ import annotations

import json

import pytest

from context.server.tool_calls import CallStream, Parsed, ToolCall, parse

NAMES = frozenset({"get_weather", "add"})
WEATHER = ToolCall("get_weather", '{"city": "Oslo"}')


def calls(text: str, names: frozenset[str] = NAMES) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parse(text, names).calls]


# -- formats ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}',  # stopped before the close tag
    '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>',  # arguments as text
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
    '[TOOL_CALLS] {"name": "get_weather", "arguments": {"city": "Oslo"}}',
    '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}',
    '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
    '  {"name": "get_weather", "arguments": {"city": "Oslo"}}\n',
])
def test_each_format_gives_the_call(text: str) -> None:
    assert parse(text, NAMES) == Parsed("", (WEATHER,))


def test_several_calls_and_the_text_around_them() -> None:
    text = ('Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    got = parse(text, NAMES)
    assert got.content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in got.calls] == [("get_weather", {"city": "Oslo"}),
                                                                      ("add", {"a": 1, "b": 2})]
    assert calls('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "arguments": {}}]') \
        == [("add", {"a": 1}), ("get_weather", {})]
    assert calls('[TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]get_weather[ARGS]{}') == [("add", {"a": 1}),
                                                                                       ("get_weather", {})]
    assert calls('<|python_tag|>{"name": "add", "parameters": {"a": 1}}; {"name": "add", "parameters": {"a": 2}}') \
        == [("add", {"a": 1}), ("add", {"a": 2})]
    assert parse('Sure.<|python_tag|>{"name": "add", "parameters": {}}', NAMES).content == "Sure."
    assert parse('Checking. [TOOL_CALLS][{"name": "add", "arguments": {}}]', NAMES).content == "Checking."
    before_after = parse('A <tool_call>{"name": "add", "arguments": {}}</tool_call> B', NAMES)
    assert before_after.content == "A\nB" and len(before_after.calls) == 1


def test_unicode_and_nested_arguments_survive() -> None:
    args = {"q": "Zürich ☃ \"quoted\" </tool_call>", "n": [1, {"deep": None}]}
    text = f"<tool_call>{json.dumps({'name': 'add', 'arguments': args})}</tool_call>"
    # the close tag inside a JSON string ends the block early: the block's JSON is broken, so no call
    assert parse(text, NAMES).calls == ()
    args.pop("q")
    got = parse(f"<tool_call>{json.dumps({'name': 'add', 'arguments': args}, ensure_ascii=False)}</tool_call>", NAMES)
    assert json.loads(got.calls[0].arguments) == args
    got = parse('<tool_call>{"name": "add", "arguments": {"city": "Zürich"}}</tool_call>', NAMES)
    assert got.calls[0].arguments == '{"city": "Zürich"}'


# -- what stays text -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "",
    "Just an answer.",
    "Use <tool_call> tags to call tools.",
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}</tool_call>',  # a brace short
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}} extra</tool_call>',
    "<tool_call>not json</tool_call>",
    "<tool_call></tool_call>",
    '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not a tool of the request
    '<tool_call>{"name": ["get_weather"], "arguments": {}}</tool_call>',
    '<tool_call>{"arguments": {"city": "Oslo"}}</tool_call>',  # no name
    '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "add", "arguments": "not json"}</tool_call>',
    '<tool_call>["get_weather"]</tool_call>',
    '<tool_call>{"name": "add", "arguments": {}}</tool_call><tool_call>{"name": "nope"}</tool_call>',  # one bad
    "[TOOL_CALLS]",
    "[TOOL_CALLS] sorry",
    '[TOOL_CALLS][{"name": "add", "arguments": {}}',
    "[TOOL_CALLS]add[ARGS]not json",
    "<|python_tag|>brave_search.call(query=\"oslo\")",  # Llama's built-ins
    '<|python_tag|>{"name": "add", "parameters": {}} trailing',
    '{"name": "get_weather"}',  # no arguments key
    '{"answer": 42}',
    '{"name": "get_weather", "parameters": {"city": "Oslo"}} and more text',
    "{not json at all",
    "[" * 5000 + "]" * 5000,
    "<tool_call>" + "[" * 100_000 + "</tool_call>",  # past the recursion limit
    '<tool_call>{"name": "add", "arguments": {"a": NaN}}</tool_call>',  # not JSON OpenAI reads
    "\x00<tool_call>\udcff</tool_call>",
])
def test_malformed_or_foreign_output_stays_text(text: str) -> None:
    assert parse(text, NAMES) == Parsed(text, ())


def test_no_tools_means_no_parsing() -> None:
    text = '<tool_call>{"name": "add", "arguments": {}}</tool_call>'
    assert parse(text, frozenset()) == Parsed(text, ())
    assert parse(text, frozenset({"get_weather"})).calls == ()


# -- streaming --------------------------------------------------------------------------------------------------------
def stream(pieces: list[str], names: frozenset[str] = NAMES) -> tuple[str, Parsed, str]:
    s = CallStream(names)
    shown = "".join(s.feed(p) for p in pieces)
    parsed, rest = s.finish()
    return shown, parsed, rest


def chars(text: str) -> list[str]:
    return list(text)


@pytest.mark.parametrize("text", [
    "Plain text, no calls.  ",
    "Let me look. <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>",
    "Hmm <tool_ca then not a tag",
    "<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call> broken",
    "  {\"name\": \"add\", \"parameters\": {\"a\": 1}}",
    "{braces but prose}",
    "Before.[TOOL_CALLS][{\"name\": \"add\", \"arguments\": {}}]",
    "Thinking...<|python_tag|>{\"name\": \"add\", \"parameters\": {}}",
    "\n\n",
])
def test_the_stream_shows_exactly_the_content(text: str) -> None:
    for pieces in (chars(text), [text], [text[:7], text[7:]]):
        shown, parsed, rest = stream(pieces)
        assert parsed == parse(text, NAMES)
        assert shown + rest == parsed.content
        assert not any(m in shown for m in ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"))


def test_the_stream_holds_back_only_what_could_be_a_marker() -> None:
    s = CallStream(NAMES)
    assert s.feed("Hello") == "Hello"
    assert s.feed(" <tool") == ""  # maybe a marker (and the space before it)
    assert s.feed("s are fun") == " <tools are fun"
    assert s.feed(" ") == ""
    assert s.finish() == (Parsed("Hello <tools are fun ", ()), " ")
