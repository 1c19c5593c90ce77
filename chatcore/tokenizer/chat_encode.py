"""Chat prompts rendered with the model's own template and encoded so that text a user typed never becomes a
special token; shared by the tokenizer backends (``tokenizers`` and tiktoken)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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
        """Render and encode a conversation. Special-token strings inside messages stay plain text.

        Each special-token string in a message is swapped for a private-use placeholder before rendering;
        the rendered text is split at the special tokens the template wrote, and every other stretch is
        encoded as plain text with the placeholders restored. With no special strings in the messages
        this is exactly how transformers encodes the rendered prompt.
        """
        if self._special_re is None:
            return self.encode(self.render_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                          **extra))
        hidden: list[str] = []
        safe = [_hide(m, self._special_re, hidden) for m in messages]
        text = self.render_chat_template(safe, add_generation_prompt=add_generation_prompt, **extra)
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids += self.encode(_restore(text[pos : m.start()], hidden))
            ids.append(self._special_ids[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self.encode(_restore(text[pos:], hidden))
        return ids


_MARK = re.compile("\uE000([0-9]+)\uE001")


def _hide(value: Any, special: re.Pattern[str], hidden: list[str]) -> Any:
    """Copy of a message with every special-token string (and our marker chars) in its strings hidden."""
    if isinstance(value, str):
        def swap(m: re.Match[str]) -> str:
            hidden.append(m.group())
            return f"\uE000{len(hidden) - 1}\uE001"
        return re.sub(f"{special.pattern}|[\uE000\uE001]", swap, value)
    if isinstance(value, Mapping):
        return {k: (v if k == "role" else _hide(v, special, hidden)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_hide(v, special, hidden) for v in value]
    return value


def _restore(text: str, hidden: list[str]) -> str:
    return _MARK.sub(lambda m: hidden[int(m.group(1))], text)
