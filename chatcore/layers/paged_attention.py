"""Attention over paged KV memory: B sequences at once, each with its own block table.

Layout (flash-attn's paged layout): one layer's keys and values ``k_pool``/``v_pool`` [num_blocks, block_size,
Hkv, D]; sequence b's key at position p lives in block ``block_tables[b, p // block_size]`` at row
``p % block_size``. Queries ``q`` [N, Hq, D] are the new rows of every sequence, grouped by sequence in order:
sequence b's rows are ``q[cu_q[b] : cu_q[b + 1]]``, and they are its *last* rows, so with ``seq_lens[b]`` keys
(the new rows' own included) its row i sits at position ``seq_lens[b] - (cu_q[b + 1] - cu_q[b]) + i``
(causal, bottom-right aligned, as :func:`chatcore.layers.attention.attend_chunk`). Keys are stored rotated.

Options as in :mod:`chatcore.layers.attention`: ``sliding_window`` (the query at p sees keys p - window < j <= p),
``alibi`` slopes [Hq] (float32; ``slope * (j - p)`` added to the scores), ``sinks`` (with a window, the first
``sinks`` keys stay visible too), ``scales``: a quantized pool's key and value scales [num_blocks, block_size,
Hkv] float32 (the pools then hold int8 / float8_e4m3fn codes, :mod:`chatcore.layers.kv_quant`).

Backends: one function each in :data:`PAGED_BACKENDS`, all with the same arguments. ``torch`` and ``math``
(here) gather each sequence's blocks into contiguous keys and values (dequantized when quantized), then run
the chunk math of :mod:`chatcore.layers.attention` per sequence; they read ``cu_q`` and ``seq_lens`` on the host,
so they are correct anywhere but not capturable in a CUDA graph. The GPU kernels (``triton``, ``flash``) are
registered in the same dict (at the bottom: :mod:`chatcore.layers.triton_paged` and
:mod:`chatcore.layers.flash_paged`, imported on first use); a backend not registered takes ``torch``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from chatcore.layers.attention import _alibi_bias, _causal_mask, _math, attend_chunk
from chatcore.layers.kv_quant import dequantize

Scales = tuple[torch.Tensor, torch.Tensor]
# (q, k_pool, v_pool, cu_q, seq_lens, block_tables, max_q, sliding_window, alibi, sinks, scales) -> [N, Hq, D]
PagedBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int,
                         int | None, torch.Tensor | None, int, Scales | None], torch.Tensor]


def attend_paged(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, *, cu_q: torch.Tensor,
                 seq_lens: torch.Tensor, block_tables: torch.Tensor, max_q: int, backend: str,
                 sliding_window: int | None = None, alibi: torch.Tensor | None = None, sinks: int = 0,
                 scales: Scales | None = None) -> torch.Tensor:
    """Causal attention of the new rows q [N, Hq, D] of B sequences over their paged keys and values.

    ``cu_q`` int32 [B + 1]: row offsets of each sequence's queries (cu_q[0] = 0, cu_q[B] = N); ``seq_lens`` int32
    [B]: keys each sequence has, its new rows included; ``block_tables`` int32 [B, W]: each sequence's blocks
    (entries past its last block are ignored; 0 pads); ``max_q``: the most rows any sequence has. Returns
    [N, Hq, D] in q's dtype."""
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding window must be positive, got {sliding_window}")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    fn = PAGED_BACKENDS.get(backend, PAGED_BACKENDS["torch"])
    return fn(q, k_pool, v_pool, cu_q, seq_lens, block_tables, max_q, sliding_window, alibi, sinks, scales)


def gather(pool: torch.Tensor, table: torch.Tensor, first: int, end: int, scale: torch.Tensor | None,
           dtype: torch.dtype) -> torch.Tensor:
    """Positions ``first .. end-1`` of one sequence (``table``: its blocks, int [W]) -> [Hkv, end - first, D] in
    ``dtype`` (dequantized when ``scale`` is given)."""
    bs = pool.shape[1]
    lo, hi = first // bs, -(-end // bs)
    index = table[lo:hi].to(device=pool.device, dtype=torch.long)   # a no-op for a table already there
    rows = pool.index_select(0, index).flatten(0, 1)[first - lo * bs: end - lo * bs]
    if scale is not None:
        sc = scale.index_select(0, index).flatten(0, 1)[first - lo * bs: end - lo * bs]
        rows = dequantize(rows, sc, dtype)
    return rows.transpose(0, 1)


def _first_key(s: int, t: int, sliding_window: int | None, sinks: int, block_size: int) -> int:
    """The first position worth gathering (a block boundary): keys before every query's window are skipped,
    unless sinks keep the first ones visible."""
    if sliding_window is None or sinks:
        return 0
    cut = s - t + 1 - sliding_window
    return max(0, cut) // block_size * block_size


def _masked_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, sliding_window: int | None,
                  alibi: torch.Tensor | None, sinks: int) -> torch.Tensor:
    """SDPA with an explicit mask (windows with sinks, which the chunk backends do not take)."""
    t, hq, _ = q.shape
    hkv, s, _ = k.shape
    visible = _causal_mask(t, s, start, q.device, sliding_window, sinks)
    if alibi is None:
        mask = visible.view(1, 1, t, s)
    else:
        mask = _alibi_bias(alibi, t, s, start, q.device).masked_fill(~visible, float("-inf")).to(q.dtype)[None]
    if hq != hkv:
        k, v = k.repeat_interleave(hq // hkv, dim=0), v.repeat_interleave(hq // hkv, dim=0)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask)
    return out[0].transpose(0, 1)


def _per_sequence(chunk_backend: str) -> PagedBackend:
    def run(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, cu_q: torch.Tensor, seq_lens: torch.Tensor,
            block_tables: torch.Tensor, max_q: int, sliding_window: int | None, alibi: torch.Tensor | None,
            sinks: int, scales: Scales | None) -> torch.Tensor:
        bounds, lens = cu_q.tolist(), seq_lens.tolist()
        tables = block_tables.to(device=k_pool.device, dtype=torch.long)
        ks, vs = (None, None) if scales is None else scales
        slopes = None if alibi is None else alibi.to(device=q.device, dtype=torch.float32)
        out = torch.empty_like(q)
        for b, s in enumerate(lens):
            lo, hi = bounds[b], bounds[b + 1]
            t = hi - lo
            if t == 0:
                continue
            if not t <= s:
                raise ValueError(f"sequence {b} has {t} new rows but only {s} keys")
            first = _first_key(s, t, sliding_window, sinks, k_pool.shape[1])
            k = gather(k_pool, tables[b], first, s, ks, q.dtype)
            v = gather(v_pool, tables[b], first, s, vs, q.dtype)
            start = s - t - first
            if sinks and sliding_window is not None:
                if chunk_backend == "math":
                    o = _math(q[lo:hi], k, v, start, sliding_window, slopes, sinks)
                else:
                    o = _masked_torch(q[lo:hi], k, v, start, sliding_window, slopes, sinks)
            else:
                o = attend_chunk(q[lo:hi], k, v, start=start, backend=chunk_backend, sliding_window=sliding_window,
                                 alibi=slopes)
            out[lo:hi] = o
        return out

    return run


PAGED_BACKENDS: dict[str, PagedBackend] = {"torch": _per_sequence("torch"), "math": _per_sequence("math")}


# the GPU kernels (chatcore.layers.triton_paged, chatcore.layers.flash_paged), imported on first use; the prompt
# chunks of their batches take the gather path above with the triton chunk backend
_GATHER_TRITON = _per_sequence("triton")


def _triton(*args: Any) -> torch.Tensor:   # attend_paged's backend arguments, in order
    from chatcore.layers.triton_paged import attend_triton

    return attend_triton(*args, chunks=_GATHER_TRITON)


def _flash(*args: Any) -> torch.Tensor:
    from chatcore.layers.flash_paged import attend_flash

    return attend_flash(*args, chunks=_GATHER_TRITON)


PAGED_BACKENDS.update(triton=_triton, flash=_flash)
