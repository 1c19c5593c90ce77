"""The float64 reference of one decode query over a cache, written out from the definitions (the Triton
decode kernel's tests and the quantized cache's share it)."""

from __future__ import annotations

import math

import torch


def reference(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: int, window: int | None, sinks: int,
              slopes: torch.Tensor | None) -> torch.Tensor:
    """float64 attention of q [Hq, D] at ``pos`` over cache rows 0..pos, written out from the definitions."""
    hq, d = q.shape
    rep = hq // kc.shape[0]
    k = kc[:, : pos + 1].double().repeat_interleave(rep, 0)
    v = vc[:, : pos + 1].double().repeat_interleave(rep, 0)
    scores = torch.einsum("hd,hsd->hs", q.double(), k) / math.sqrt(d)
    j = torch.arange(pos + 1)
    if slopes is not None:
        scores = scores + slopes.double()[:, None] * (j - pos)[None, :]
    if window is not None:
        scores = scores.masked_fill(~((j > pos - window) | (j < sinks))[None, :], float("-inf"))
    return torch.einsum("hs,hsd->hd", scores.softmax(-1), v)
