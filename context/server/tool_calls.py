"""Tool calls in a model's finished output text (plain Python, no torch).

The formats chat-tuned models write, in the order they are tried:

- Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call, text around
  them (the last block may lack its closing tag when the model stopped on its end token);
- Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (text before it), and the newer
  ``[TOOL_CALLS]name[ARGS]{...}`` form;
- Llama 3.x: ``<|python_tag|>{"name": ..., "parameters": {...}}`` (several separated by ``;``), text before it;
- Llama 3.x JSON: the whole output one object ``{"name": ..., "parameters": {...}}`` (or ``"arguments"``).

A call counts only when its JSON parses, it names a function in ``names`` (the request's tools) and its arguments
are an object. Parsing is all or nothing: when any call of the output fails, there are no calls and the whole text
stays text. The text outside the calls is kept (the piece before the first call right-stripped, the others
stripped, joined by newlines), so a stream that showed the text before the first marker (:class:`CallStream`) can
finish with exactly the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"
PYTHON_TAG = "<|python_tag|>"
MARKERS = (HERMES_OPEN, MISTRAL, PYTHON_TAG)
_HERMES = re.compile(re.escape(HERMES_OPEN) + r"(.*?)(?:" + re.escape(HERMES_CLOSE) + r"|\Z)", re.DOTALL)
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str   # a JSON object, as text (OpenAI's shape)


@dataclass(frozen=True)
class Parsed:
    """The output split: ``content`` the text outside the calls ("" when there is none), ``calls`` in order."""

    content: str
    calls: tuple[ToolCall, ...]


class _Refused(Exception):
    """One call of the output does not parse: the output is text."""


def parse(text: str, names: Collection[str]) -> Parsed:
    """The tool calls in ``text`` naming a function of ``names``; no calls (``text`` as it is) when there are none
    or any of them fails."""
    if names:
        for finder in (_hermes, _mistral, _python_tag, _whole_json):
            try:
                found = finder(text, names)
            except (_Refused, ValueError, RecursionError, TypeError):
                return Parsed(text, ())
            if found is not None:
                return found
    return Parsed(text, ())


# -- the formats -----------------------------------------------------------------------------------------------------
def _hermes(text: str, names: Collection[str]) -> Parsed | None:
    if HERMES_OPEN not in text:
        return None
    pieces, calls, at = [], [], 0
    for m in _HERMES.finditer(text):
        pieces.append(text[at: m.start()])
        calls.append(_call(_only_json(m.group(1)), names))
        at = m.end()
    pieces.append(text[at:])
    return Parsed(_outside(pieces), tuple(calls))


def _mistral(text: str, names: Collection[str]) -> Parsed | None:
    at = text.find(MISTRAL)
    if at < 0:
        return None
    rest = text[at + len(MISTRAL):].lstrip()
    calls: list[ToolCall] = []
    while True:
        if rest.startswith(("[", "{")):   # [{...}, ...] or {...}
            value, end = _DECODER.raw_decode(rest)
            calls += [_call(item, names) for item in (value if isinstance(value, list) else [value])]
        elif MISTRAL_ARGS in rest:   # name[ARGS]{...}
            name, _, after = rest.partition(MISTRAL_ARGS)
            body = after.lstrip()
            args, end = _DECODER.raw_decode(body)
            end += len(rest) - len(body)
            calls.append(_call({"name": name.strip(), "arguments": args}, names))
        else:
            break
        rest = rest[end:].lstrip()
        if not rest.startswith(MISTRAL):
            break
        rest = rest[len(MISTRAL):].lstrip()
    if not calls:
        raise _Refused("nothing after [TOOL_CALLS]")
    return Parsed(_outside([text[:at], rest]), tuple(calls))


def _python_tag(text: str, names: Collection[str]) -> Parsed | None:
    at = text.find(PYTHON_TAG)
    if at < 0:
        return None
    body = text[at + len(PYTHON_TAG):].strip()
    calls = [_call(_only_json(part), names) for part in _split_semicolons(body)]
    if not calls:
        raise _Refused("nothing after <|python_tag|>")
    return Parsed(_outside([text[:at]]), tuple(calls))


def _whole_json(text: str, names: Collection[str]) -> Parsed | None:
    body = text.strip()
    if not body.startswith("{"):
        return None
    try:
        value = _only_json(body)
    except ValueError:
        return None   # text that happens to start with a brace
    if not (isinstance(value, dict) and "name" in value and ("parameters" in value or "arguments" in value)):
        return None
    return Parsed("", (_call(value, names),))


# -- pieces ----------------------------------------------------------------------------------------------------------
def _only_json(s: str) -> object:
    """One JSON value filling ``s`` (whitespace around it allowed)."""
    s = s.strip()
    value, end = _DECODER.raw_decode(s)
    if s[end:].strip():
        raise _Refused("text after the JSON value")
    return value


def _split_semicolons(body: str) -> list[str]:
    """``{...}; {...}`` as its JSON values' texts (a ``;`` inside a string stays in it)."""
    out, rest = [], body
    while rest:
        _, end = _DECODER.raw_decode(rest)
        out.append(rest[:end])
        rest = rest[end:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        elif rest:
            raise _Refused("text after a call")
    return out


def _call(value: object, names: Collection[str]) -> ToolCall:
    if not isinstance(value, dict):
        raise _Refused("a call is not an object")
    name = value.get("name")
    if not isinstance(name, str) or name not in names:
        raise _Refused(f"no tool named {name!r}")
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):   # some models write the arguments as JSON text
        args = _only_json(args) if args.strip() else {}
    if not isinstance(args, dict):
        raise _Refused("arguments are not an object")
    return ToolCall(name, json.dumps(args, ensure_ascii=False, allow_nan=False))


def _outside(pieces: list[str]) -> str:
    first, others = pieces[0].rstrip(), [p.strip() for p in pieces[1:]]
    return "\n".join(p for p in (first, *others) if p)


# -- streaming -------------------------------------------------------------------------------------------------------
class CallStream:
    """Text of a streaming reply that may end in tool calls: :meth:`feed` returns what can be shown now (everything
    before a marker; trailing whitespace and what could be the start of a marker are held back), :meth:`finish` the
    parse of the whole text and the rest of its ``content`` to show (all held text when there are no calls).
    An output whose first visible character is ``{`` is held whole (it may be a Llama JSON call)."""

    def __init__(self, names: Collection[str]) -> None:
        self.names = names
        self._full = ""
        self._shown = 0
        self._held = False   # a marker (or a leading brace) was seen: nothing more is shown until the end

    def feed(self, piece: str) -> str:
        if not piece:
            return ""
        self._full += piece
        if self._held:
            return ""
        full = self._full
        stripped = full.lstrip()
        if stripped.startswith("{"):
            self._held = True
            return ""
        cut = min((i for i in (full.find(m, self._shown) for m in MARKERS) if i >= 0), default=-1)
        if cut >= 0:
            self._held = True
        else:
            cut = len(full) - _marker_prefix(full)
        safe = full[:cut].rstrip()
        if len(safe) <= self._shown:
            return ""
        out, self._shown = full[self._shown: len(safe)], len(safe)
        return out

    def finish(self) -> tuple[Parsed, str]:
        parsed = parse(self._full, self.names)
        shown = self._full[: self._shown]
        rest = parsed.content[len(shown):] if parsed.content.startswith(shown) else parsed.content
        return parsed, rest


def _marker_prefix(text: str) -> int:
    """Length of the longest end of ``text`` that begins a marker."""
    best = 0
    for m in MARKERS:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best
