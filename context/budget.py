"""Exact token counts through the model's own chat template, per message, cached.

A chat template renders a conversation; for the templates in use (ChatML, Llama 3, ...) the token
sequence is the first message's tokens, then one segment per further message, then the generation
prompt. The segments are measured once per distinct message (and the template overhead once per
tokenizer), so planning a turn never re-tokenizes the history. Whether a template really composes
this way is checked once on probe conversations; if it does not, `additive` is False and plans
render the whole kept conversation instead (still exact, just slower).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class ChatTokenizer(Protocol):
    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                            **extra: Any) -> list[int]: ...


class WithTools:
    """A chat tokenizer whose template always gets ``tools`` (the function tools a conversation may call), so every
    count and prompt of a TokenBudget on it is the one the model sees with them."""

    def __init__(self, tokenizer: ChatTokenizer, tools: list[dict[str, Any]]) -> None:
        self.tokenizer = tokenizer
        self.tools = tools

    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, allow_special=allow_special)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                            **extra: Any) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  **{"tools": self.tools, **extra})


_PROBE = {"role": "system", "content": "a"}
_PROBES: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "system", "content": "You help."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello! 12 apples."}, {"role": "user", "content": "And?\n ok"}),
    ({"role": "user", "content": "first"}, {"role": "assistant", "content": "second"},
     {"role": "user", "content": "third"}),
)
Key = tuple[str, str, str]


def message_key(msg: Mapping[str, Any]) -> Key:
    extra = {k: v for k, v in msg.items() if k not in ("role", "content")}
    return msg["role"], msg["content"], json.dumps(extra, sort_keys=True) if extra else ""


class TokenBudget:
    """Per-message token segments of one tokenizer's chat template, cached by (role, content, extra)."""

    def __init__(self, tokenizer: ChatTokenizer, *, max_cache: int = 200_000) -> None:
        self.tokenizer = tokenizer
        self._seg: dict[Key, list[int]] = {}
        self._first: dict[Key, list[int]] = {}
        self._max_cache = max_cache
        self._head = tokenizer.apply_chat_template([_PROBE])
        self.generation_prompt = self._tail([_PROBE, {"role": "user", "content": "a"}])
        self.additive = self._check_additive()

    # -- measuring ----------------------------------------------------------------------------------
    def _tail(self, msgs: list[dict[str, Any]]) -> list[int]:
        plain = self.tokenizer.apply_chat_template(msgs)
        full = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        return full[len(plain):] if full[: len(plain)] == plain else []

    def _check_additive(self) -> bool:
        if not self.generation_prompt and self.tokenizer.apply_chat_template(
                [_PROBE], add_generation_prompt=True) != self._head:
            return False
        for probe in _PROBES:
            try:
                expect = self.tokenizer.apply_chat_template(list(probe), add_generation_prompt=True)
                got = self.join(list(probe))
            except ValueError:
                return False
            if got != expect:
                return False
        return True

    def segment(self, msg: Mapping[str, Any]) -> list[int]:
        """Tokens the template adds for `msg` when it follows other messages (do not mutate)."""
        key = message_key(msg)
        seg = self._seg.get(key)
        if seg is None:
            full = self.tokenizer.apply_chat_template([_PROBE, dict(msg)])
            if full[: len(self._head)] != self._head:
                raise ValueError("the chat template does not render messages one after another")
            seg = full[len(self._head):]
            self._remember(self._seg, key, seg)
        return seg

    def first(self, msg: Mapping[str, Any]) -> list[int]:
        """Tokens of `msg` as the first message (with whatever the template puts before it)."""
        key = message_key(msg)
        seg = self._first.get(key)
        if seg is None:
            seg = self.tokenizer.apply_chat_template([dict(msg)])
            self._remember(self._first, key, seg)
        return seg

    def _remember(self, cache: dict[Key, list[int]], key: Key, seg: list[int]) -> None:
        if len(cache) >= self._max_cache:
            cache.pop(next(iter(cache)))
        cache[key] = seg

    def count(self, msg: Mapping[str, Any]) -> int:
        return len(self.segment(msg))

    @property
    def overhead(self) -> int:
        """Template tokens around one message (measured once), plus the generation prompt."""
        return len(self.segment({"role": "user", "content": ""})) + len(self.generation_prompt)

    # -- whole prompts ------------------------------------------------------------------------------
    def join(self, msgs: Sequence[Mapping[str, Any]]) -> list[int]:
        """The prompt for `msgs` with the generation prompt, from cached segments (or a full render)."""
        if not msgs:
            return list(self.tokenizer.apply_chat_template([], add_generation_prompt=True))
        ids = list(self.first(msgs[0]))
        for m in msgs[1:]:
            ids += self.segment(m)
        ids += self.generation_prompt
        return ids

    def render(self, msgs: Sequence[Mapping[str, Any]]) -> list[int]:
        """The exact prompt: joined segments when the template is additive, else a full render."""
        if self.additive:
            return self.join(msgs)
        return list(self.tokenizer.apply_chat_template([dict(m) for m in msgs], add_generation_prompt=True))

    # -- oversize messages --------------------------------------------------------------------------
    def truncate(self, msg: Mapping[str, Any], max_tokens: int, marker: str) -> dict[str, Any]:
        """A copy of `msg` whose segment has at most `max_tokens` tokens: head and tail of its content
        kept around `marker`. Raises ValueError when even the empty message does not fit."""
        frame = self.count({**msg, "content": ""})
        if frame + len(self.tokenizer.encode(marker)) >= max_tokens:
            raise ValueError("no room left for any of the message")
        ids = self.tokenizer.encode(msg["content"])
        room = max_tokens - frame - len(self.tokenizer.encode(marker))
        while room > 0:
            head, tail = ids[: (room + 1) // 2], ids[len(ids) - room // 2:] if room // 2 else []
            text = self.tokenizer.decode(head) + marker + self.tokenizer.decode(tail)
            out = {**msg, "content": text}
            if self.count(out) <= max_tokens:
                return out
            room -= max(1, (self.count(out) - max_tokens))
        raise ValueError("no room left for any of the message")
