"""OpenAI items and messages <-> chatcore messages (role, text, OpenAI extras such as tool calls).

Text only: an image, audio or file part is refused with a 400 naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import bad_request

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system", "tool": "tool"}
_TEXT_PARTS = ("text", "input_text", "output_text", "refusal")


@dataclass(frozen=True)
class NewItem:
    """A message to store (or to show the model): role, text and OpenAI extras (tool_calls, tool_call_id, name)."""

    role: str
    content: str
    extra: dict[str, Any] = field(default_factory=dict)
    id: str = ""   # a placeholder id for planning before it is stored


def _text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or a list of content parts", param)
    out = []
    for i, part in enumerate(content):
        if isinstance(part, str):
            out.append(part)
            continue
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in _TEXT_PARTS:
            raise bad_request(f"{param}[{i}]: content of type {kind!r} is not supported (text only)", f"{param}[{i}]")
        value = part.get("text", part.get("refusal", ""))
        if not isinstance(value, str):
            raise bad_request(f"{param}[{i}].text must be a string", f"{param}[{i}].text")
        out.append(value)
    return "".join(out)


def _role(value: Any, param: str) -> str:
    role = _ROLES.get(value) if isinstance(value, str) else None
    if role is None:
        raise bad_request(f"{param}: role must be one of {', '.join(_ROLES)}, got {value!r}", param)
    return role


def chat_message(m: Any, i: int) -> dict[str, Any]:
    """A Chat Completions message as the chat template gets it."""
    param = f"messages[{i}]"
    if not isinstance(m, Mapping):
        raise bad_request(f"{param} must be an object with a role and content", param)
    out: dict[str, Any] = {"role": _role(m.get("role"), f"{param}.role"),
                           "content": _text(m.get("content"), f"{param}.content")}
    for name in ("name", "tool_call_id", "tool_calls"):
        if m.get(name) is not None:
            out[name] = _tool_calls(m[name]) if name == "tool_calls" else m[name]
    return out


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    """Tool calls with their arguments as objects (chat templates index them), parsed from OpenAI's JSON text."""
    out = []
    for c in calls if isinstance(calls, list) else []:
        c = dict(c)
        fn = dict(c.get("function") or {})
        args = fn.get("arguments")
        if isinstance(args, str):
            with contextlib.suppress(ValueError):
                fn["arguments"] = json.loads(args)
        c["function"] = fn
        out.append(c)
    return out


def input_items(value: Any, param: str = "input") -> list[NewItem]:
    """Responses API `input` (a string, or a list of message / function-call items) as messages to store."""
    if isinstance(value, str):
        return [NewItem("user", value)]
    if not isinstance(value, list):
        raise bad_request(f"{param} must be a string or a list of items", param)
    out = []
    for i, item in enumerate(value):
        p = f"{param}[{i}]"
        if not isinstance(item, Mapping):
            raise bad_request(f"{p} must be an object", p)
        kind = item.get("type", "message")
        if kind == "message":
            out.append(NewItem(_role(item.get("role"), f"{p}.role"), _text(item.get("content"), f"{p}.content")))
        elif kind == "function_call_output":
            output = item.get("output")
            out.append(NewItem("tool", output if isinstance(output, str) else json.dumps(output),
                               {"tool_call_id": str(item.get("call_id", ""))}))
        elif kind == "function_call":
            call = {"id": str(item.get("call_id", "")), "type": "function",
                    "function": {"name": str(item.get("name", "")), "arguments": item.get("arguments", "{}")}}
            out.append(NewItem("assistant", "", {"tool_calls": _tool_calls([call])}))
        else:
            raise bad_request(f"{p}: items of type {kind!r} are not supported", f"{p}.type")
    if not out:
        raise bad_request(f"{param} is empty; give at least one item", param)
    return out


def output_item(m: Any, status: str | None = None) -> dict[str, Any]:
    """A stored message (storage.Message) as a Responses / Conversations item."""
    extra = getattr(m, "extra", {}) or {}
    state = status or ("completed" if m.status == "complete" else "in_progress" if m.status == "streaming"
                       else "incomplete")
    if m.role == "tool":
        return {"type": "function_call_output", "id": m.id, "call_id": extra.get("tool_call_id", ""),
                "output": m.content, "status": state}
    if m.role == "assistant":
        part: dict[str, Any] = {"type": "output_text", "text": m.content, "annotations": [], "logprobs": []}
    else:
        part = {"type": "input_text", "text": m.content}
    return {"type": "message", "id": m.id, "status": state, "role": m.role, "content": [part]}


def item_list(items: list[dict[str, Any]], has_more: bool = False) -> dict[str, Any]:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


def join_users(items: list[NewItem], tail: Any = None) -> tuple[bool, list[NewItem]]:
    """Consecutive user items as one message (joined by a blank line), as chatcore's sessions keep them: a user
    message stored under a user message is an edit of it (a sibling). With `tail` (the message they go under) a
    user message too, the first is joined onto it: (True, items) says so, and `store_items` stores that one as
    an edit of `tail` (the original stays as a branch)."""
    out: list[NewItem] = []
    for item in items:
        if out and item.role == "user" and out[-1].role == "user":
            out[-1] = dataclasses.replace(out[-1], content=out[-1].content + "\n\n" + item.content)
        else:
            out.append(item)
    join = bool(out) and tail is not None and tail.role == "user" and out[0].role == "user"
    if join:
        out[0] = dataclasses.replace(out[0], content=tail.content + "\n\n" + out[0].content)
    return join, out


def store_items(store: Any, session_id: str, tail: Any, items: list[NewItem], join: bool) -> list[Any]:
    """Store `items` (from `join_users`) under `tail` (a storage.Message, or None: as new roots), in order."""
    out = []
    at = tail.id if tail is not None else None
    for i, item in enumerate(items):
        if i == 0 and join:
            msg = store.edit_message(session_id, tail.id, item.content)
        else:
            msg = store.append_message(session_id, item.role, item.content, parent_id=at, extra=item.extra or None)
        out.append(msg)
        at = msg.id
    return out
