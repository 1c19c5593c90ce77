"""Tools in the HTTP API: which a request lets the model call (`tools`, `tool_choice`), how the chat template gets
them, and parsed calls (context/server/tool_calls.py) in OpenAI's shapes: chat completions' `message.tool_calls`
and streamed `delta.tool_calls`, the Responses API's `function_call` output items.

`tool_choice`: "auto" (the default) and "required" or a named function pass the tools to the chat template and
parse the output (a named function: only calls to it); "none" does neither. chatcore does not constrain decoding:
"required" or a named function do not force the model to call anything.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import bad_request
from .tool_calls import ToolCall


@dataclass(frozen=True)
class ToolUse:
    """What a request's tools do: ``template`` the tools the chat template gets (None: none), ``names`` the
    functions whose calls are parsed from the output (empty: the output is text), ``choice`` as responses show
    it."""

    template: list[dict[str, Any]] | None
    names: frozenset[str]
    choice: Any = "auto"


def _function(tool: Any, i: int) -> dict[str, Any]:
    """A tool as chat templates take it, ``{"type": "function", "function": {name, description, parameters}}``,
    from the chat completions shape or the Responses API's flat one."""
    param = f"tools[{i}]"
    if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
        raise bad_request(f"{param}: only tools of type 'function' are supported", param)
    fn = tool.get("function") if isinstance(tool.get("function"), Mapping) else \
        {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise bad_request(f"{param}: a function tool needs a name", f"{param}.name")
    return {"type": "function", "function": dict(fn)}


def tool_use(tools: list[Any] | None, choice: Any) -> ToolUse:
    """The request's `tools` and `tool_choice` checked (a 400 naming the field otherwise)."""
    functions = [_function(t, i) for i, t in enumerate(tools or [])]
    names = frozenset(f["function"]["name"] for f in functions)
    if choice is None:
        choice = "auto"
    if choice == "none" or not functions:
        if choice not in ("none", "auto"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return ToolUse(None, frozenset(), choice)
    if choice in ("auto", "required"):
        return ToolUse(functions, names, choice)
    named = None
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        fn = choice.get("function")
        named = fn.get("name") if isinstance(fn, Mapping) else choice.get("name")
    if not isinstance(named, str) or named not in names:
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or a function of tools, "
                          f"got {choice!r}", "tool_choice")
    return ToolUse(functions, frozenset({named}), choice)


# -- chat completions ------------------------------------------------------------------------------------------------
def chat_tool_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    """`message.tool_calls` of a choice."""
    return [{"id": "call_" + secrets.token_hex(12), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def delta_tool_calls(tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same calls as a stream's `delta.tool_calls` (each whole, with its index)."""
    return [{"index": i, **c} for i, c in enumerate(tool_calls)]


# -- responses -------------------------------------------------------------------------------------------------------
def call_id(message_id: str, i: int) -> str:
    """The call id of the i-th call in a stored reply: the same every time the reply is read, so the client's
    `function_call_output` names the call it answers."""
    return "call_" + hashlib.sha256(f"{message_id}:{i}".encode()).hexdigest()[:24]


def function_call_items(message_id: str, calls: tuple[ToolCall, ...], status: str) -> list[dict[str, Any]]:
    """The Responses API's `function_call` items of a reply's calls."""
    out = []
    for i, c in enumerate(calls):
        cid = call_id(message_id, i)
        out.append({"type": "function_call", "id": "fc_" + cid[5:], "call_id": cid, "name": c.name,
                    "arguments": c.arguments, "status": status})
    return out
