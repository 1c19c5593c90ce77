"""The server's pieces without a server: item joining, the thread pump, the locked engine, error shapes."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

import pytest

from context.server.backend import LockedEngine
from context.server.errors import APIError, translate
from context.server.items import NewItem, chat_message, input_items, join_users
from context.server.pump import Pump


@dataclass(frozen=True)
class _Msg:
    id: str
    role: str
    content: str


def test_consecutive_user_items_join() -> None:
    items = input_items([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "input_text",
                                                                                           "text": "b"}]},
                         {"role": "assistant", "content": "c"}, {"role": "developer", "content": "d"},
                         {"type": "function_call_output", "call_id": "x1", "output": "42"}])
    join, out = join_users(items)
    assert not join
    assert [(i.role, i.content) for i in out] == [("user", "a\n\nb"), ("assistant", "c"), ("system", "d"),
                                                  ("tool", "42")]
    assert out[-1].extra == {"tool_call_id": "x1"}
    join, out = join_users([NewItem("user", "new")], _Msg("m1", "user", "old"))
    assert join and out[0].content == "old\n\nnew"
    join, out = join_users([NewItem("user", "new")], _Msg("m1", "assistant", "old"))
    assert not join and out[0].content == "new"


def test_bad_items_name_the_field() -> None:
    with pytest.raises(APIError) as e:
        input_items([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}])
    assert e.value.status == 400 and e.value.param == "input[0].content[0]"
    with pytest.raises(APIError) as e:
        chat_message({"role": "robot", "content": "x"}, 2)
    assert e.value.param == "messages[2].role"
    with pytest.raises(APIError):
        input_items([])
    m = chat_message({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}, 0)
    assert m["tool_calls"][0]["function"]["arguments"] == {"a": 1}   # templates index the arguments


def test_errors_translate_to_openai_statuses() -> None:
    from chatcore.errors import PromptTooLong
    from context.errors import SessionBusy
    from storage import NotFound, StoreUnavailable

    assert translate(PromptTooLong("too long")).body()["error"]["code"] == "context_length_exceeded"
    assert translate(SessionBusy("busy")).status == 409
    assert translate(NotFound("session", "x")).status == 404
    assert translate(StoreUnavailable("redis://h", "down")).status == 503
    assert translate(RuntimeError("boom")).status == 500
    assert set(translate(ValueError("bad")).body()["error"]) == {"message", "type", "param", "code"}


def test_pump_closes_the_iterator_when_stopped() -> None:
    closed = threading.Event()

    def numbers() -> Any:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    async def read() -> list[int]:
        pump = Pump(numbers, asyncio.get_running_loop())
        got = []
        async for n in pump:
            got.append(n)
            if n == 2:
                pump.stop()
        return got
    got = asyncio.run(read())
    assert got[:3] == [0, 1, 2] and closed.wait(5)

    async def failing() -> None:
        def boom() -> Any:
            yield 1
            raise ValueError("inside")
        async for _ in Pump(boom, asyncio.get_running_loop()):
            pass
    with pytest.raises(ValueError, match="inside"):
        asyncio.run(failing())


class _FakeGen:
    def __init__(self, log: list[str], name: str, n: int) -> None:
        self.log, self.name, self.n, self.stats = log, name, n, None

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> str:
        if self.n == 0:
            raise StopIteration
        self.n -= 1
        self.log.append(self.name)
        return self.name

    def close(self) -> None:
        self.log.append(self.name + "-closed")


class _FakeEngine:
    window = 64

    def __init__(self) -> None:
        self.log: list[str] = []

    def generate(self, ids: Any, params: Any = None, *, slot: Any = None, sink_tokens: Any = None) -> _FakeGen:
        return _FakeGen(self.log, ids, 3)


def test_locked_engine_runs_one_generation_at_a_time() -> None:
    inner = _FakeEngine()
    engine = LockedEngine(inner)
    assert engine.window == 64
    a, b = engine.generate("a"), engine.generate("b")
    next(a)
    started = threading.Event()

    def other() -> None:
        started.set()
        list(b)
        b.close()
    t = threading.Thread(target=other)
    t.start()
    started.wait()
    t.join(0.2)
    assert t.is_alive()          # b waits for a to end
    rest = list(a)
    a.close()
    t.join(5)
    assert rest == ["a", "a"]
    assert [x for x in inner.log if not x.endswith("-closed")] == ["a", "a", "a", "b", "b", "b"]
    assert sorted(x for x in inner.log if x.endswith("-closed")) == ["a-closed", "b-closed"]


def test_a_taken_port_is_one_line_before_anything_loads(tmp_path: Any) -> None:
    import socket
    import subprocess
    import sys

    from _server_helpers import REPO, server_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "chatcore", "serve", "--model", str(tmp_path / "none"),
                               "--port", str(port)], env=server_env(CHATCORE_HOME=str(tmp_path)), cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"chatcore: error: cannot listen on 127.0.0.1:{port} (Address already in use); pick another --port or --host"]


def test_a_budget_with_tools_renders_what_the_template_renders(tiny_model: Any) -> None:
    from chatcore.tokenizer.hf import HFTokenizer
    from context.session import _budget_for

    tok = HFTokenizer.from_dir(tiny_model)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function",
                                                                  "function": {"name": "f", "arguments": {}}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c"}]
    budget = _budget_for(tok, tools)
    assert budget.render(msgs) == tok.apply_chat_template(msgs, add_generation_prompt=True, tools=tools)
    assert budget.render(msgs) != _budget_for(tok).render(msgs)
    assert _budget_for(tok, [dict(t) for t in tools]) is budget and _budget_for(tok, None) is _budget_for(tok)


def test_tool_use_and_reply_items() -> None:
    from context.server.responses import reply_items
    from context.server.tool_output import call_id, tool_use

    flat = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    use = tool_use([flat], None)
    assert use.template == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert use.names == {"f"} and use.choice == "auto"
    assert tool_use([flat], "none").template is None and tool_use([flat], "none").names == frozenset()
    assert tool_use([flat, {**flat, "name": "g"}], {"type": "function", "name": "g"}).names == {"g"}
    assert tool_use(None, None).names == frozenset()
    for bad in ("sometimes", {"type": "function", "name": "h"}, {"type": "file_search"}):
        with pytest.raises(APIError) as e:
            tool_use([flat], bad)
        assert e.value.param == "tool_choice"
    with pytest.raises(APIError):
        tool_use([{"type": "function"}], None)

    @dataclass(frozen=True)
    class Reply:
        id: str
        content: str
        role: str = "assistant"
        status: str = "complete"

    calls_only = reply_items(Reply("m1", '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'),
                             "completed", frozenset({"f"}))
    assert calls_only == [{"type": "function_call", "id": "fc_" + call_id("m1", 0)[5:], "call_id": call_id("m1", 0),
                           "name": "f", "arguments": '{"a": 1}', "status": "completed"}]
    text = reply_items(Reply("m2", "plain"), "completed", frozenset({"f"}), logprobs=[{"token": "p"}])
    assert [i["type"] for i in text] == ["message"] and text[0]["content"][0]["logprobs"] == [{"token": "p"}]
    assert call_id("m1", 0) != call_id("m1", 1) != call_id("m2", 0)
