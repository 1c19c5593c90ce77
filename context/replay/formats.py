"""Recorded conversations: JSONL, one conversation per line, OpenAI-style or ShareGPT.

    {"id": "trip", "messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                                {"role": "assistant", "content": "...", "pinned": true}, ...]}
    {"id": "chat2", "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}

A leading system message (or a top-level "system" string) becomes the system prompt. `"pinned": true` on
a message pins it (it is never pruned). `id` (or `name`) names the conversation in reports; without one
it is `line<N>`. Each line is parsed on its own: a bad line is reported with its number and the others
still replay. Message ids are positional (`m0`, `m1`, ...), so reports never depend on random ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.errors import InvalidInput
from storage.export import check_plain, content_text, load_json

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "bard": "assistant", "bing": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool",
                  "function_response": "tool"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "tool", "function": "tool"}
EXTRA_KEYS = ("name", "tool_calls", "tool_call_id")


@dataclass(frozen=True)
class ReplayMessage:
    """A message as the context manager sees it (`id`, `role`, `content`, `extra`)."""

    id: str
    role: str
    content: str
    extra: dict[str, Any] = field(default_factory=dict)
    pinned: bool = False


@dataclass(frozen=True)
class RecordedConversation:
    """One recorded conversation: its name, the input line it came from, system prompt and messages."""

    id: str
    line: int
    system: str | None
    messages: tuple[ReplayMessage, ...]

    @property
    def user_turns(self) -> int:
        return sum(1 for m in self.messages if m.role == "user")


@dataclass(frozen=True)
class InputError:
    """A line that could not be parsed: where, and why (one line, ready to print)."""

    source: str
    line: int
    message: str
    conversation: str | None = None

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}"


class FormatError(ValueError):
    pass


def _content(value: Any, i: int) -> str:
    try:
        return content_text(value, i)
    except InvalidInput as exc:
        raise FormatError(str(exc)) from None


def _pinned(item: dict[str, Any], i: int) -> bool:
    value = item.get("pinned", False)
    if not isinstance(value, bool):
        raise FormatError(f"message {i + 1}: 'pinned' must be true or false, got {value!r}")
    return value


def _items(rec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], bool]]:
    out: list[tuple[str, str, dict[str, Any], bool]] = []
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list):
            raise FormatError("'messages' must be a list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise FormatError(f"message {i + 1} must be an object, got {type(m).__name__}")
            role = OPENAI_ROLES.get(m.get("role"))  # type: ignore[arg-type]
            if role is None:
                raise FormatError(f"message {i + 1} has role {m.get('role')!r}; expected system, user, "
                                  "assistant or tool")
            extra = {k: m[k] for k in EXTRA_KEYS if k in m and m[k] is not None}
            out.append((role, _content(m.get("content"), i), extra, _pinned(m, i)))
        return out
    if "conversations" in rec:
        turns = rec["conversations"]
        if not isinstance(turns, list):
            raise FormatError("'conversations' must be a list")
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise FormatError(f"turn {i + 1} must be an object, got {type(t).__name__}")
            role = SHAREGPT_ROLES.get(str(t.get("from")).lower())
            if role is None:
                raise FormatError(f"turn {i + 1} comes 'from' {t.get('from')!r}; expected human, gpt, system "
                                  "or tool")
            out.append((role, _content(t.get("value"), i), {}, _pinned(t, i)))
        return out
    raise FormatError("expected an OpenAI-style ('messages') or ShareGPT ('conversations') record")


def parse_record(rec: Any, line: int) -> RecordedConversation:
    """One decoded JSON record into a RecordedConversation; raises FormatError saying what is wrong."""
    if not isinstance(rec, dict):
        raise FormatError(f"expected a JSON object, got {type(rec).__name__}")
    name = rec.get("id", rec.get("name", f"line{line}"))
    if not isinstance(name, (str, int)) or isinstance(name, bool) or not str(name).strip():
        raise FormatError(f"'id' must be a non-empty string, got {name!r}")
    items = _items(rec)
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise FormatError("'system' must be a string")
    if items and items[0][0] == "system":
        if system is not None:
            raise FormatError("both a top-level 'system' and a leading system message; keep one")
        system, items = items[0][1], items[1:]
    if not any(role == "user" for role, *_ in items):
        raise FormatError("the conversation has no user message to replay")
    messages = tuple(ReplayMessage(f"m{i}", role, content, extra, pinned)
                     for i, (role, content, extra, pinned) in enumerate(items))
    return RecordedConversation(str(name), line, system or None, messages)


def parse_lines(lines: Iterable[str | bytes],
                source: str = "<input>") -> tuple[list[RecordedConversation], list[InputError]]:
    """Parse JSONL: the conversations that parsed, and an error for each line that did not (blank lines
    and lines starting with '//' are skipped). Conversation ids must be unique. Lines may be bytes (then a
    line that is not UTF-8 is an error of its own); a UTF-8 BOM before line 1 is dropped. A value nested
    more than ``storage.export.MAX_DEPTH`` deep or a string with a lone surrogate is an error of its line."""
    return _parse(_decoded(lines), source)


def parse_records(records: Iterable[Any],
                  source: str = "<records>") -> tuple[list[RecordedConversation], list[InputError]]:
    """Already decoded records (dicts), numbered from 1 as lines are, checked as `parse_lines` checks them."""
    def checked() -> Iterator[tuple[int, Any]]:
        for n, rec in enumerate(records, 1):
            try:
                check_plain(rec)
                yield n, _Record(json.loads(json.dumps(rec)))  # a copy, as the same record read from a file
            except InvalidInput as exc:
                yield n, str(exc)
            except (TypeError, ValueError) as exc:
                yield n, f"not JSON data ({exc})"
    return _parse(checked(), source)


@dataclass(frozen=True)
class _Record:
    value: Any


def _decoded(lines: Iterable[str | bytes]) -> Iterator[tuple[int, Any]]:
    """(line number, a _Record or the reason the line is not one) for each line that is not blank."""
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            yield n, f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at byte {exc.start + 1} of the line)"
            continue
        text = (line.removeprefix("\ufeff") if n == 1 else line).strip()
        if not text or text.startswith("//"):
            continue
        try:
            yield n, _Record(load_json(text))
        except InvalidInput as exc:  # too deep, or a lone surrogate
            yield n, str(exc)
        except ValueError as exc:
            col = getattr(exc, "colno", None)
            msg = getattr(exc, "msg", str(exc))
            yield n, f"not valid JSON ({msg}{f' at column {col}' if col else ''})"


def _parse(items: Iterable[tuple[int, Any]], source: str) -> tuple[list[RecordedConversation], list[InputError]]:
    convs: list[RecordedConversation] = []
    errors: list[InputError] = []
    seen: dict[str, int] = {}
    for n, item in items:
        if not isinstance(item, _Record):
            errors.append(InputError(source, n, item))
            continue
        rec = item.value
        try:
            conv = parse_record(rec, n)
        except FormatError as exc:
            name = rec.get("id") if isinstance(rec, dict) and isinstance(rec.get("id"), str) else None
            errors.append(InputError(source, n, str(exc), name))
            continue
        if conv.id in seen:
            errors.append(InputError(source, n, f"conversation id {conv.id!r} already used on line {seen[conv.id]}",
                                     conv.id))
            continue
        seen[conv.id] = n
        convs.append(conv)
    return convs, errors


def load_file(path: str | Path) -> tuple[list[RecordedConversation], list[InputError]]:
    """Parse a JSONL file (see parse_lines). A missing or unreadable file raises OSError."""
    p = Path(path)
    with p.open("rb") as f:
        return parse_lines(f, str(p))
