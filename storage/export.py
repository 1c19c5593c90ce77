"""Export (JSON with OpenAI-style messages + our metadata, Markdown) and import (that JSON, ShareGPT
and OpenAI-style JSONL). Pure functions on dataclasses; `import_text` is the one that writes."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .codec import RESERVED, SCHEMA
from .errors import InvalidInput, MessageTooLarge, StorageError
from .keys import new_id
from .records import ROLES, STATUSES, Conversation, Message, Session, Summary

if TYPE_CHECKING:
    from .store import Store

FORMAT = "chatcore.session"
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "model": "assistant", "bard": "assistant", "bing": "assistant",
                   "function_call": "assistant", "system": "system", "tool": "tool", "function": "tool",
                   "observation": "tool", "function_response": "tool"}
_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                 "tool": "tool", "function": "tool"}
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "presence_penalty",
                  "frequency_penalty", "repetition_penalty", "stop")


# ----------------------------------------------------------------------------- export

def to_json(conv: Conversation) -> dict[str, Any]:
    """Our export: the session's metadata and every message (all branches, in the order added)."""
    s = conv.session
    summary = None if s.summary is None else {
        "text": s.summary.text, "first_id": s.summary.first_id, "last_id": s.summary.last_id,
        "tokens": s.summary.tokens, "created_at": s.summary.created_at}
    return {
        "format": FORMAT, "schema": SCHEMA,
        "session": {"id": s.id, "title": s.title, "created_at": s.created_at, "updated_at": s.updated_at,
                    "model": s.model, "system_prompt": s.system_prompt, "sampling": s.sampling,
                    "pinned": list(s.pinned), "summary": summary, "tags": list(s.tags), "tip_id": s.tip_id},
        "messages": [{"role": m.role, "content": m.content, **m.extra, "id": m.id, "parent_id": m.parent_id,
                      "status": m.status, "created_at": m.created_at, "updated_at": m.updated_at,
                      "tokens": m.tokens, "seq": m.seq} for m in conv.messages],
    }


def to_json_text(conv: Conversation) -> str:
    return json.dumps(to_json(conv), ensure_ascii=False, indent=2) + "\n"


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def to_markdown(conv: Conversation) -> str:
    """The current branch as Markdown, for reading and sharing."""
    s = conv.session
    out = [f"# {s.title or 'Untitled session'}", "",
           f"- Session: `{s.id}`", f"- Created: {_when(s.created_at)} · Updated: {_when(s.updated_at)}"]
    if s.model:
        out.append(f"- Model: {s.model}")
    if s.tags:
        out.append("- Tags: " + ", ".join(s.tags))
    if s.sampling:
        out.append("- Sampling: " + ", ".join(f"{k}={v}" for k, v in s.sampling.items()))
    if s.system_prompt:
        out += ["", "## System prompt", "", s.system_prompt]
    if s.summary:
        out += ["", "## Summary of earlier turns", "", s.summary.text]
    for m in conv.thread():
        notes = []
        alts = conv.siblings(m.id)
        if len(alts) > 1:
            notes.append(f"version {alts.index(m) + 1} of {len(alts)}")
        if m.status != "complete":
            notes.append(m.status)
        if m.id in s.pinned:
            notes.append("pinned")
        head = m.role.capitalize() + (f" ({', '.join(notes)})" if notes else "")
        out += ["", f"## {head}", "", m.content]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- import

MAX_DEPTH = 64  # nesting of an imported JSON value (what a chat template accepts, with room for the record)
_SURROGATE = re.compile("[\ud800-\udfff]")


def decode_text(raw: bytes, source: str = "<input>") -> str:
    """An import file's bytes as text: UTF-8, a leading BOM dropped; bytes that are not UTF-8 are reported
    as ``source:line: ...``."""
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        raise InvalidInput(f"{source}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte "
                           f"{exc.start - line_start + 1} of the line)") from None


def load_json(text: str) -> Any:
    """One JSON value for import or replay: ``ValueError`` (with ``msg``/``colno``) if it is not JSON,
    InvalidInput if it nests more than ``MAX_DEPTH`` deep or holds a lone surrogate (``"\\ud800"``: not
    text, it cannot be stored or tokenized)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidInput(f"nested more than {MAX_DEPTH} deep") from None
    check_plain(value)
    return value


def check_plain(value: Any) -> None:
    """Raise InvalidInput if a decoded JSON value nests more than ``MAX_DEPTH`` deep or has a string (or
    key) with a lone surrogate. Iterative: any depth is checked without recursion."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            bad = _SURROGATE.search(v)
            if bad:
                raise InvalidInput(f"a string holds a lone surrogate (\\u{ord(bad.group()):04x} at character "
                                   f"{bad.start() + 1}), which is not text")
        elif isinstance(v, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise InvalidInput(f"nested more than {MAX_DEPTH} deep")
            if isinstance(v, dict):
                stack.extend((k, depth) for k in v)
                stack.extend((x, depth + 1) for x in v.values())
            else:
                stack.extend((x, depth + 1) for x in v)


def parse_text(data: str, source: str = "<input>") -> list[Conversation]:
    """Parse an import file: one JSON document (our export, or a list of records) or JSONL with one
    record per line (our export, ShareGPT `conversations`, or OpenAI-style `messages`)."""
    return [conv for _, conv in parse_located(data, source)]


def parse_located(data: str, source: str = "<input>") -> list[tuple[str, Conversation]]:
    """`parse_text`, each conversation with where it came from (``source``, ``source: record N`` or
    ``source:line``), for reporting what is wrong with it later."""
    data = data.removeprefix("\ufeff")
    stripped = data.strip()
    if not stripped:
        raise InvalidInput(f"{source}: the file is empty")
    deep = False
    try:
        whole = json.loads(stripped)
    except RecursionError:
        whole, deep = None, True
    except ValueError:
        whole = None
    # A document on one line (a JSONL file of one record) is reported as that line.
    first_line = data[: len(data) - len(data.lstrip())].count("\n") + 1
    doc = source if "\n" in stripped else f"{source}:{first_line}"
    if isinstance(whole, (dict, list)):
        try:
            check_plain(whole)
        except InvalidInput as exc:
            raise InvalidInput(f"{doc}: {exc}") from None
    if isinstance(whole, dict):
        return [(doc, parse_record(whole, doc))]
    if isinstance(whole, list):
        return [(f"{source}: record {i + 1}", parse_record(r, f"{source}: record {i + 1}"))
                for i, r in enumerate(whole)]
    out = []
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{n}"
        try:
            rec = load_json(line)
        except InvalidInput as exc:
            raise InvalidInput(f"{where}: {exc}") from None
        except ValueError as exc:
            if deep:  # one document over several lines, too deep to parse
                raise InvalidInput(f"{source}: nested more than {MAX_DEPTH} deep") from None
            raise InvalidInput(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        out.append((where, parse_record(rec, where)))
    return out


def parse_record(rec: Any, where: str) -> Conversation:
    if not isinstance(rec, dict):
        raise InvalidInput(f"{where}: expected a JSON object, got {type(rec).__name__}")
    try:
        if rec.get("format") == FORMAT:
            return from_json(rec)
        if "conversations" in rec:
            return _from_sharegpt(rec)
        if "messages" in rec:
            return _from_openai(rec)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidInput(f"{where}: malformed record ({type(exc).__name__}: {exc})") from None
    raise InvalidInput(f"{where}: not a chatcore export, ShareGPT ('conversations') or OpenAI-style "
                       "('messages') record")


def from_json(rec: dict[str, Any]) -> Conversation:
    """Our own export back into a Conversation, exactly."""
    if rec.get("schema") != SCHEMA:
        raise InvalidInput(f"export schema {rec.get('schema')!r} is not {SCHEMA}; use a matching chatcore")
    s = rec["session"]
    summary = None
    if s.get("summary") is not None:
        sm = s["summary"]
        summary = Summary(_s(sm["text"]), _s(sm["first_id"]), _s(sm["last_id"]), sm.get("tokens"),
                          float(sm.get("created_at", 0.0)))
    messages = []
    for m in rec["messages"]:
        extra = {k: v for k, v in m.items() if k not in RESERVED}
        if m["role"] not in ROLES or m.get("status", "complete") not in STATUSES:
            raise InvalidInput(f"message {m.get('id')!r} has role {m['role']!r} / status {m.get('status')!r}")
        tokens, seq = m.get("tokens"), m.get("seq", len(messages))
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int)):
            raise InvalidInput(f"message {m.get('id')!r} has a non-integer token count")
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise InvalidInput(f"message {m.get('id')!r} has a non-integer seq")
        messages.append(Message(_s(m["id"]), _s(s["id"]), m["role"], _s(m["content"]), m.get("parent_id"),
                                m.get("status", "complete"), float(m["created_at"]), float(m["updated_at"]),
                                tokens, seq, extra))
    session = Session(
        id=_s(s["id"]), title=_s(s.get("title", "")), created_at=float(s["created_at"]),
        updated_at=float(s["updated_at"]), model=s.get("model"), system_prompt=s.get("system_prompt"),
        sampling=dict(s.get("sampling") or {}), pinned=tuple(s.get("pinned") or ()), summary=summary,
        tags=tuple(s.get("tags") or ()), tip_id=s.get("tip_id"), message_count=len(messages))
    return Conversation(session, tuple(messages))


def _s(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"expected a string, got {type(value).__name__}")
    return value


def content_text(value: Any, i: int) -> str:
    """A message's content as text: a string, or OpenAI-style text parts joined (``i``: its index, for errors)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidInput(f"message {i + 1} has a {kind!r} content part; only text is supported")
        return "".join(parts)
    raise InvalidInput(f"message {i + 1}: content must be a string or a list of text parts, "
                       f"got {type(value).__name__}")


def _linear(rec: dict[str, Any], turns: list[tuple[str, str, dict[str, Any]]]) -> Conversation:
    """A conversation from (role, content, extra) turns, one branch; a leading system turn becomes
    the system prompt."""
    system = None
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    if isinstance(rec.get("system"), str) and system is None:
        system = rec["system"]
    now = time.time()
    sid = new_id()
    messages: list[Message] = []
    for role, content, extra in turns:
        messages.append(Message(new_id(), sid, role, content,  # type: ignore[arg-type]
                                messages[-1].id if messages else None, "complete", now, now, None,
                                len(messages), extra))
    title = rec.get("title") or rec.get("name")
    if not isinstance(title, str) or not title.strip():
        first = next((m.content for m in messages if m.role == "user" and m.content.strip()), "")
        title = first.strip().splitlines()[0][:60] if first.strip() else "Imported session"
    title = title[:1024]
    sampling = {k: rec[k] for k in _SAMPLING_KEYS if k in rec}
    model = rec.get("model") if isinstance(rec.get("model"), str) else None
    session = Session(sid, title, now, now, model, system, sampling, (), None, (),
                      messages[-1].id if messages else None, len(messages))
    return Conversation(session, tuple(messages))


def _from_sharegpt(rec: dict[str, Any]) -> Conversation:
    turns = []
    for i, t in enumerate(rec["conversations"]):
        who = t.get("from") if isinstance(t, dict) else None
        role = _SHAREGPT_ROLES.get(str(who).lower())
        if role is None:
            raise InvalidInput(f"turn {i + 1} comes 'from' {who!r}; expected human/gpt/system/tool")
        turns.append((role, content_text(t.get("value"), i), {}))
    return _linear(rec, turns)


def _from_openai(rec: dict[str, Any]) -> Conversation:
    turns = []
    for i, m in enumerate(rec["messages"]):
        role = _OPENAI_ROLES.get(m.get("role")) if isinstance(m, dict) else None
        if role is None:
            raise InvalidInput(f"message {i + 1} has role {m.get('role') if isinstance(m, dict) else m!r}")
        extra = {k: v for k, v in m.items() if k in ("name", "tool_calls", "tool_call_id", "function_call")}
        turns.append((role, content_text(m.get("content"), i), extra))
    return _linear(rec, turns)


def import_text(store: Store, data: str, source: str = "<input>") -> list[Session]:
    """Parse and check everything first (nothing is written if any record is bad: not JSON, too deep, a
    lone surrogate, a message over the size limit, a value the store would refuse), then store each
    session."""
    located = parse_located(data, source)
    for where, conv in located:
        try:
            store.check_import(conv)
        except (InvalidInput, MessageTooLarge) as exc:
            exc.args = (f"{where}: {exc}",)
            raise
    done: list[Session] = []
    for _, conv in located:
        try:
            done.append(store.import_conversation(conv))
        except StorageError as exc:
            if not done:
                raise
            raise StorageError(f"{exc} (after importing {len(done)} session(s): "
                               f"{', '.join(s.id for s in done)})") from None
    return done


__all__ = ["FORMAT", "MAX_DEPTH", "check_plain", "decode_text", "from_json", "import_text", "load_json",
           "parse_located", "parse_text", "to_json", "to_json_text",
           "to_markdown"]
