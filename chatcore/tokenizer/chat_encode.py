"""Chat prompts rendered with the model's own template and encoded so that text a user typed never becomes a
special token; shared by the tokenizer backends (``tokenizers`` and tiktoken)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chatcore.tokenizer import chat_template
from chatcore.tokenizer.chat_template import ChatTemplateError


def token_str(value: Any) -> str | None:
    """A special token as tokenizer configs write it (a string, or a dict with ``content``)."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def pick_template(value: Any) -> str | None:
    """The chat template of a tokenizer config: a string, or the ``default`` of a list of named ones."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        return named.get("default") or next(iter(named.values()), None)
    return None


class SpecialSafeChat:
    """Mixin: ``render_chat_template`` / ``apply_chat_template`` for a backend that sets ``chat_template``,
    ``special_tokens`` (bos/eos/unk/pad strings), ``_special_re`` (a regex of every special-token string, or
    None) and ``_special_ids`` (string -> id), and whose ``encode`` keeps special-token strings as text."""

    chat_template: str | None
    special_tokens: dict[str, str | None]
    _special_re: re.Pattern[str] | None
    _special_ids: dict[str, int]
    _hiding: _Hiding | None = None

    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        raise NotImplementedError

    def render_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                             **extra: Any) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; give a raw prompt instead")
        return chat_template.render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens, **extra)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                            **extra: Any) -> list[int]:
        """Render and encode a conversation. No string from the caller becomes a special token: not the
        messages (every field, names and tool-call arguments included), nor ``tools=``, ``documents=`` or any
        other template variable, at any depth of their dicts and lists (keys too).

        Those values must be strings, numbers, booleans, None, mappings and lists/tuples, nested at most
        ``MAX_DEPTH`` deep (anything else is a :class:`ChatTemplateError`): the template sees a copy in which
        each special-token string, and each piece of one at either end of a string that is not a plain word
        (so that two strings the template writes side by side cannot join into one), is swapped for a digit
        marker. The rendered text
        is split at the special tokens the template wrote, and every other stretch is encoded as plain text
        with the markers restored. With no special strings in the inputs this is exactly how transformers
        encodes the rendered prompt.
        """
        taken = set(extra) & set(self.special_tokens)
        if taken:
            raise ChatTemplateError(f"{', '.join(sorted(taken))}: set by the tokenizer, not a template input")
        hider = _Hider(self._special_re, self._hiding_for())
        safe = hider.copy(list(messages), "messages")
        safe_extra = {name: hider.copy(value, name) for name, value in extra.items()}
        text = self.render_chat_template(safe, add_generation_prompt=add_generation_prompt, **safe_extra)
        if self._special_re is None:
            return self.encode(text)
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids += self.encode(hider.restore(text[pos : m.start()]))
            ids.append(self._special_ids[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self.encode(hider.restore(text[pos:]))
        return ids

    def _hiding_for(self) -> _Hiding:
        """What hiding needs of this tokenizer's special tokens (built once per tokenizer)."""
        if self._hiding is None:
            names = list(self._special_ids) if self._special_re is not None else []
            nonce = "1" + "".join(secrets.choice("023456789") for _ in range(23))
            self._hiding = _Hiding(frozenset(t[:i] for t in names for i in range(1, len(t))),
                                   frozenset(t[i:] for t in names for i in range(1, len(t))),
                                   max(map(len, names), default=1) - 1, nonce, re.compile(nonce + "([0-9]{8})"))
        return self._hiding


@dataclass(frozen=True)
class _Hiding:
    """Proper prefixes (``heads``) and suffixes (``tails``) of the special-token strings, the longest such
    piece, and the marker: a random 24-digit nonce (its only ``1`` first, so two markers never overlap) and
    an 8-digit index. Digits pass through ``tojson``, ``repr``, case filters and escaping unchanged; the
    nonce never reaches the output, so a caller cannot forge a marker."""

    heads: frozenset[str]
    tails: frozenset[str]
    longest: int
    nonce: str
    mark: re.Pattern[str]


_WORD = re.compile(r"[\w-]*")
MAX_DEPTH = 64  # nesting of a template input (a tool's JSON schema is a handful of levels)


class _Unfit(Exception):
    """A template input that cannot be checked; ``path`` is filled in on the way out."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []


class _Hider:
    """Copies template inputs with special-token strings swapped for markers, and restores rendered text."""

    def __init__(self, special: re.Pattern[str] | None, hiding: _Hiding) -> None:
        self._special = special
        self._h = hiding
        self.hidden: list[str] = []

    def copy(self, value: Any, where: str) -> Any:
        try:
            return self._copy(value, 0)
        except _Unfit as exc:
            path = where + "".join(reversed(exc.path))
            raise ChatTemplateError(f"chat template input {path}: {exc.reason}") from None

    def restore(self, text: str) -> str:
        hidden = self.hidden
        return self._h.mark.sub(lambda m: hidden[int(m.group(1))], text)

    def _swap(self, piece: str) -> str:
        self.hidden.append(piece)
        return f"{self._h.nonce}{len(self.hidden) - 1:08d}"

    def _text(self, s: str) -> str:
        if self._special is None:
            return s
        s = self._special.sub(lambda m: self._swap(m.group()), s)
        if _WORD.fullmatch(s):  # "user", "function", "string": compared by templates, kept as they are
            return s
        # A special token's first part at the end of the string (whitespace aside), or its last part at the
        # start, would join with what the template writes next to it.
        body = s.rstrip()
        for k in range(min(self._h.longest, len(body)), 0, -1):
            if body[-k:] in self._h.heads:
                s = body[:-k] + self._swap(body[-k:]) + s[len(body):]
                break
        lead = len(s) - len(s.lstrip())
        for k in range(min(self._h.longest, len(s) - lead), 0, -1):
            if s[lead : lead + k] in self._h.tails:
                s = s[:lead] + self._swap(s[lead : lead + k]) + s[lead + k:]
                break
        return s

    def _copy(self, value: Any, depth: int) -> Any:
        if isinstance(value, str):
            return self._text(value)
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if depth >= MAX_DEPTH:
            raise _Unfit(f"nested more than {MAX_DEPTH} deep")
        if isinstance(value, Mapping):
            out: dict[Any, Any] = {}
            for k, v in value.items():
                try:
                    if not (k is None or isinstance(k, (str, bool, int, float))):
                        raise _Unfit(f"a key of type {type(k).__name__}")
                    out[self._text(k) if isinstance(k, str) else k] = self._copy(v, depth + 1)
                except _Unfit as exc:
                    exc.path.append(f"[{k!r}]")
                    raise
            return out
        if isinstance(value, (list, tuple)):
            items: list[Any] = []
            for i, v in enumerate(value):
                try:
                    items.append(self._copy(v, depth + 1))
                except _Unfit as exc:
                    exc.path.append(f"[{i}]")
                    raise
            return items
        raise _Unfit(f"a {type(value).__name__}; give strings, numbers, booleans, None, dicts and lists")
