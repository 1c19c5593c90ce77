"""Prefix matching of token ids: what a KV slot holding some tokens can reuse for a new prompt.

Pure Python, no torch, so the context manager (which plans turns without a model) imports it too.
"""

from __future__ import annotations

from collections.abc import Sequence

_BLOCK = 4096   # tokens compared at once


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids `a` and `b` share."""
    a = a if isinstance(a, list) else list(a)
    b = b if isinstance(b, list) else list(b)
    n = min(len(a), len(b))
    # list comparison runs in C: whole blocks first, element by element only inside the first block that differs
    for start in range(0, n, _BLOCK):
        end = min(n, start + _BLOCK)
        if a[start:end] != b[start:end]:
            return next(i for i in range(start, end) if a[i] != b[i])
    return n


def reused_prefix(held: Sequence[int], ids: Sequence[int]) -> int:
    """Prompt tokens a slot holding `held` saves for the prompt `ids` in `Engine.generate`: the common prefix,
    but never the whole prompt (at least one prompt token runs, to give the logits of the first new token)."""
    return min(common_prefix(held, ids), len(ids) - 1)
