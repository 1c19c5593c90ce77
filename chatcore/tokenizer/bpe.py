"""Byte-pair encoding over mergeable ranks, as tiktoken defines it.

A piece (the bytes of one pre-tokenizer match) starts as single bytes; the adjacent pair whose joined bytes
have the lowest rank is merged (the leftmost one on a tie) until no joined pair has a rank. Each resulting
part's rank is its token id. Short pieces use a plain scan; long ones (a run of 10,000 letters) a heap, so
that their cost grows as n log n, not n squared; both give the same parts.
"""

from __future__ import annotations

import base64
import binascii
import heapq
from pathlib import Path

from chatcore.errors import ModelFormatError

_NONE = 1 << 62          # the rank of a pair that is not a token
_HEAP_FROM = 64          # bytes in a piece from which the heap is used


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file (one ``<base64 token> <rank>`` per line; Llama 3's ``tokenizer.model``)."""
    ranks: dict[bytes, int] = {}
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as exc:
                raise ModelFormatError(f"{path}:{number} is not a tiktoken rank line ({exc}); "
                                       "re-download the file") from None
    missing = [b for b in range(256) if bytes((b,)) not in ranks]
    if missing:
        raise ModelFormatError(f"{path} has no token for the byte 0x{missing[0]:02x} ({len(missing)} bytes missing); "
                               "a tiktoken rank file must cover every byte")
    return ranks


def looks_like_rank_file(path: Path) -> bool:
    """Whether ``path`` starts like a tiktoken rank file (a SentencePiece ``tokenizer.model`` is protobuf)."""
    try:
        with path.open("rb") as f:
            first = f.readline(512)
    except OSError:
        return False
    parts = first.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except (ValueError, binascii.Error):
        return False
    return True


def merge(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Token ids of one piece (its bytes must all be in ``ranks``, as :func:`read_ranks` checks)."""
    if len(piece) >= _HEAP_FROM:
        return _merge_heap(piece, ranks)
    return _merge_scan(piece, ranks)


def _merge_scan(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    get = ranks.get
    starts = list(range(len(piece) + 1))          # part k is piece[starts[k]:starts[k + 1]]
    pairs = [get(piece[i : i + 2], _NONE) for i in range(len(piece) - 1)]  # pairs[k]: parts k and k + 1 joined
    while pairs:
        best = min(pairs)
        if best == _NONE:
            break
        k = pairs.index(best)                     # the leftmost pair of the lowest rank
        del starts[k + 1], pairs[k]
        if k > 0:
            pairs[k - 1] = get(piece[starts[k - 1] : starts[k + 1]], _NONE)
        if k < len(pairs):
            pairs[k] = get(piece[starts[k] : starts[k + 2]], _NONE)
    return [ranks[piece[a:b]] for a, b in zip(starts, starts[1:], strict=False)]


def _merge_heap(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """The same merges with a heap of (rank, left start, right start, right end) and a linked list of parts;
    an entry is stale when either of its parts has changed since it was pushed."""
    n = len(piece)
    get = ranks.get
    nxt = list(range(1, n + 2))                   # nxt[s]: start of the part after the one starting at s
    prv = list(range(-1, n))
    alive = [True] * (n + 1)
    heap = [(r, i, i + 1, i + 2) for i in range(n - 1) if (r := get(piece[i : i + 2], _NONE)) != _NONE]
    heapq.heapify(heap)
    while heap:
        _, left, mid, end = heapq.heappop(heap)
        if not (alive[left] and alive[mid] and nxt[left] == mid and nxt[mid] == end):
            continue
        alive[mid] = False
        nxt[left] = end
        if end <= n:
            prv[end] = left
        before = prv[left]
        if before >= 0 and (r := get(piece[before:end], _NONE)) != _NONE:
            heapq.heappush(heap, (r, before, left, end))
        if end < n and (r := get(piece[left : nxt[end]], _NONE)) != _NONE:
            heapq.heappush(heap, (r, left, end, nxt[end]))
    out = []
    s = 0
    while s < n:
        out.append(ranks[piece[s : nxt[s]]])
        s = nxt[s]
    return out
