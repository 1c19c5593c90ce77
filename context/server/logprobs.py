"""Logprobs in OpenAI's shape: ``{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`` per generated
token, for `choices[].logprobs.content` (chat completions) and an output_text's `logprobs` (responses).

A token's text is its id decoded alone by the model's tokenizer; ``bytes`` are that text's UTF-8 bytes (a token
holding part of a character decodes to U+FFFD, so its bytes are those of U+FFFD).
"""

from __future__ import annotations

import math
import threading
from typing import Any

_FLOOR = -9999.0   # what OpenAI reports for a token the model gives no chance (JSON has no -Infinity)
_MAX_CACHED = 1 << 18


class TokenTexts:
    """Token id -> (text, bytes) through one tokenizer, cached (safe from many threads)."""

    def __init__(self, tokenizer: Any) -> None:
        self._decode = tokenizer.decode
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._lock = threading.Lock()

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        text = self._decode([token_id])
        hit = (text, list(text.encode("utf-8", errors="surrogatepass")))
        with self._lock:
            if len(self._cache) < _MAX_CACHED:
                self._cache[token_id] = hit
        return hit

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self.get(token_id)
        return {"token": text, "logprob": logprob if math.isfinite(logprob) else _FLOOR, "bytes": raw}


def token_logprob(texts: TokenTexts, ev: Any, top: int) -> dict[str, Any]:
    """The entry of one engine event (a TokenEvent or ChatEvent with ``token_id``, ``logprob``, ``top_logprobs``):
    its token, and the ``top`` most likely tokens of its step."""
    out = texts.entry(ev.token_id, ev.logprob)
    pairs = (getattr(ev, "top_logprobs", None) or ())[:top]
    out["top_logprobs"] = [texts.entry(t, lp) for t, lp in pairs]
    return out
