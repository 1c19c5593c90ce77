"""Incremental detokenization that never splits a UTF-8 character.

The prefix / read-offset window technique (Hugging Face TGI, vLLM): keep a small window of
recent ids, ``ids[:read]`` already shown (the "prefix") and ``ids[read:]`` not yet shown. Each
push decodes the prefix and the whole window and emits the difference. Decoding with a prefix
keeps tokenizers that add or strip a leading space per decode call (SentencePiece) correctly
spaced, and the window keeps each step O(window) instead of O(everything generated).

A byte-level tokenizer decodes an incomplete UTF-8 sequence as U+FFFD, so while the window's
text ends with U+FFFD nothing is emitted; the character is emitted once its last byte arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
PREFIX_TOKENS = 5  # prompt tokens kept from prefix_ids to seed the window (as vLLM)
# Past this many held ids (only a model emitting invalid bytes gets here) the text is emitted up to
# a point that can no longer change; the window then stays under 2 * MAX_HELD_TOKENS + a few ids.
MAX_HELD_TOKENS = 16
_TAIL_TOKENS = 3  # a UTF-8 character is <= 4 bytes: 3 more tokens settle the one before them


class IncrementalDetokenizer:
    """Token ids in, newly completed text out."""

    def __init__(self, decode: Callable[[list[int]], str], prefix_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(prefix_ids)[-PREFIX_TOKENS:]  # the window
        self._read = len(self._ids)  # ids[:read] are shown (or prompt); ids[read:] are held
        self._prefix_text = self._decode_prefix()

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text completed since the last push (maybe "")."""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) > len(self._prefix_text) and not text.endswith(REPLACEMENT):
            return self._advance(text, len(self._ids))
        if len(self._ids) - self._read > MAX_HELD_TOKENS:
            return self._release(text)
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held, decoded as the tokenizer decodes it."""
        if self._read == len(self._ids):
            return ""
        return self._advance(self._decode(self._ids), len(self._ids))

    # -- internals ---------------------------------------------------------------------------

    def _decode_prefix(self) -> str:
        return self._decode(self._ids[: self._read]) if self._read else ""

    def _advance(self, text: str, upto: int) -> str:
        """Emit `text` (the decode of ids[:upto]) past the prefix; slide the window to start at
        the old read offset, with ids[:upto] now shown."""
        out = text[len(self._prefix_text) :]
        self._ids = self._ids[self._read :]
        self._read = upto - self._read
        self._prefix_text = self._decode_prefix()
        return out

    def _release(self, text: str) -> str:
        """Too many tokens held: the model is emitting invalid bytes. Emit up to a token boundary
        whose text can no longer change (the next tokens did not complete a character across it),
        keeping the last few tokens held, so the window stays bounded."""
        lowest = max(self._read, len(self._ids) - _TAIL_TOKENS - 4)
        for cut in range(len(self._ids) - _TAIL_TOKENS, lowest, -1):
            head = self._decode(self._ids[:cut])
            if len(head) > len(self._prefix_text) and text.startswith(head):
                return self._advance(head, cut)
        return self._advance(text, len(self._ids))  # a decoder we cannot reason about: give up holding
