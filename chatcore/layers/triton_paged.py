"""The project's own decode kernel over paged KV memory (Triton), and the paged chunk path.

Layout (:mod:`chatcore.layers.paged_attention`): one layer's keys and values ``k_pool``/``v_pool``
[num_blocks, block_size, Hkv, D]; sequence ``b``'s key ``j`` lies in block ``block_tables[b, j // block_size]``
at offset ``j % block_size``. ``seq_lens[b]`` counts sequence b's keys, its new rows included (they are written
before attention runs); queries ``q`` [N, Hq, D] are already rotated, grouped by sequence (``cu_q``).

:func:`paged_decode`: B sequences x one query each (every sequence's last query row), in two launches, as
:mod:`chatcore.layers.triton_decode` does for one contiguous cache:

1. ``_split_k``: grid (sequences, KV heads, splits); each program takes one KV head's whole query group (the
   GQA rows share every key load) over one slice of its sequence's keys, with an online softmax, ALiBi, a
   sliding window and attention sinks (the first ``sinks`` keys stay visible beside the window). A key tile's
   rows are found through the block table column by column, so any power-of-two block size works (the tests
   use 16, flash-attn's layout wants 256);
2. ``_merge``: combines the splits' partial results (log-sum-exp weights), one program per sequence and
   query head.

A quantized pool (int8 or float8 e4m3 codes, float32 scales [num_blocks, block_size, Hkv]:
:mod:`chatcore.layers.kv_quant`) is read as codes and scales, as the contiguous kernel reads them: a tile's
scores are ``q . codes`` times the keys' scales and the probabilities are multiplied by the values' scales
before their product with the value codes.

Each sequence's length is read from device memory and the grid depends only on the batch size and the table
width, so a batched decode step made of these launches can be captured in a CUDA graph and replayed at any
lengths (:mod:`chatcore.batch.graphs`). ``TRITON_INTERPRET=1`` runs the same kernels on the CPU (the tests do).

:func:`attend_triton` (the ``triton`` backend of :func:`~chatcore.layers.paged_attention.attend_paged`): a
decode-only batch is one :func:`paged_decode`. Prompt chunks (sequences with several new rows) take no kernel
of their own: each such sequence's live blocks are gathered into contiguous keys and values (the gather path
of :mod:`chatcore.layers.paged_attention`) and the existing chunk attention runs on them (its triton backend:
the FlashAttention-2 prefill kernel of :mod:`chatcore.layers.triton_prefill`, or cuDNN for a whole prompt). A
chunk's cost is its attention; the gather copies its keys once per layer. Mixed batches read ``cu_q`` on the
host (one synchronisation per layer), so only decode-only batches are captured in CUDA graphs.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from chatcore.layers.kv_quant import QMAX
from chatcore.layers.triton_decode import online_softmax_step

# one sequence's prompt chunk over its paged keys: attend_paged's backend arguments, in order
ChunkPath = Callable[..., torch.Tensor]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

BLOCK_N = 64            # keys per inner step
_TARGET_PROGRAMS = 132  # one wave of an H100's / H200's multiprocessors (triton_decode.py's choice)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_ptr, v_ptr, ks_ptr, vs_ptr, table_row, kv_head, start, lo_visible, hi, last,
                 slopes, scale, offs_n, offs_d, s_blk, s_tok, s_head, ss_blk, ss_tok, BS: tl.constexpr,
                 D: tl.constexpr, HAS_ALIBI: tl.constexpr, PREC: tl.constexpr, QUANT: tl.constexpr):
    """One BLOCK_N step of the online softmax over keys start .. start+BLOCK_N-1 of one sequence (visible:
    lo_visible .. hi-1), each key's row found through the sequence's block table row ``table_row``."""
    cols = start + offs_n
    ok = (cols >= lo_visible) & (cols < hi)
    blk = tl.load(table_row + cols // BS, mask=ok, other=0).to(tl.int64)
    tok = blk * s_blk + (cols % BS) * s_tok + kv_head * s_head
    dmask = offs_d[None, :] < D
    base = tok[:, None] + offs_d[None, :]
    k = tl.load(k_ptr + base, mask=ok[:, None] & dmask, other=0.0)
    v = tl.load(v_ptr + base, mask=ok[:, None] & dmask, other=0.0)
    k_scale = scale
    v_scale = scale
    if QUANT:
        srow = blk * ss_blk + (cols % BS) * ss_tok + kv_head
        k_scale = tl.load(ks_ptr + srow, mask=ok, other=0.0)
        v_scale = tl.load(vs_ptr + srow, mask=ok, other=0.0)
    return online_softmax_step(acc, m_i, l_i, q, k, v, k_scale, v_scale, ok, cols, last, slopes, scale, HAS_ALIBI,
                               PREC, QUANT)


@triton.jit
def _split_k(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, lens_ptr, table_ptr, cu_ptr, slopes_ptr, part_ptr, ml_ptr, scale,
             table_width, sq_row, sq_head, s_blk, s_tok, s_head, ss_blk, ss_tok, HQ: tl.constexpr, GROUP: tl.constexpr,
             BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr, SPLITS: tl.constexpr,
             BLOCK: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr,
             HAS_CU: tl.constexpr, PREC: tl.constexpr, PIPELINE: tl.constexpr, QUANT: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seqlen = tl.load(lens_ptr + seq)
    last = seqlen - 1                             # position of the query (the sequence's newest row)
    q_row = seq
    if HAS_CU:
        q_row = tl.load(cu_ptr + seq + 1) - 1     # the sequence's last query row
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(seqlen - WINDOW, 0)
    per = tl.cdiv(tl.cdiv(seqlen - lo, SPLITS), BLOCK) * BLOCK
    start = lo + split * per
    end = tl.minimum(start + per, seqlen)
    table_row = table_ptr + seq.to(tl.int64) * table_width

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK)
    heads = kv_head * GROUP + offs_g
    row_ok = offs_g < GROUP
    q = tl.load(q_ptr + (q_row.to(tl.int64) * sq_row + heads * sq_head)[:, None] + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    slopes = tl.zeros([BLOCK_G], dtype=tl.float32)
    if HAS_ALIBI:
        slopes = tl.load(slopes_ptr + heads, mask=row_ok, other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    if SINKS > 0:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if split == 0:   # keys the window hides but the sinks keep: 0 .. min(SINKS, lo)-1
            sink_end = tl.minimum(lo, SINKS)
            s0 = 0
            while s0 < sink_end:
                acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_ptr, v_ptr, ks_ptr, vs_ptr, table_row, kv_head, s0,
                                             0, sink_end, last, slopes, scale, offs_n, offs_d, s_blk, s_tok, s_head,
                                             ss_blk, ss_tok, BS, D, HAS_ALIBI, PREC, QUANT)
                s0 += BLOCK
    if PIPELINE:   # compiled: a counted loop, which Triton software-pipelines
        for it in tl.range(0, tl.cdiv(end - start, BLOCK)):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_ptr, v_ptr, ks_ptr, vs_ptr, table_row, kv_head,
                                         start + it * BLOCK, start, end, last, slopes, scale, offs_n, offs_d, s_blk,
                                         s_tok, s_head, ss_blk, ss_tok, BS, D, HAS_ALIBI, PREC, QUANT)
    else:   # Triton's CPU interpreter cannot take a loop bound read from memory in range(): the same steps
        s0 = start
        while s0 < end:
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_ptr, v_ptr, ks_ptr, vs_ptr, table_row, kv_head, s0,
                                         start, end, last, slopes, scale, offs_n, offs_d, s_blk, s_tok, s_head,
                                         ss_blk, ss_tok, BS, D, HAS_ALIBI, PREC, QUANT)
            s0 += BLOCK
    slot = (seq * HQ + heads) * SPLITS + split
    tl.store(part_ptr + slot[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(ml_ptr + slot * 2, m_i, mask=row_ok)
    tl.store(ml_ptr + slot * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge(part_ptr, ml_ptr, out_ptr, cu_ptr, HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
           SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HAS_CU: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = seq
    if HAS_CU:
        q_row = tl.load(cu_ptr + seq + 1) - 1
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < SPLITS
    slot = (seq * HQ + head) * SPLITS + offs_s
    m = tl.load(ml_ptr + slot * 2, mask=s_ok, other=float("-inf"))
    ll = tl.load(ml_ptr + slot * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
    part = tl.load(part_ptr + slot[:, None] * D + offs_d[None, :], mask=s_ok[:, None] & (offs_d[None, :] < D),
                   other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.sum(ll * w, 0)
    tl.store(out_ptr + (q_row.to(tl.int64) * HQ + head) * D + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < D)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def num_splits(batch: int, num_kv_heads: int, max_keys: int) -> int:
    """Splits of each sequence per KV head: enough programs to fill the GPU at the tables' full width."""
    most = max(1, triton.cdiv(max_keys, BLOCK_N * 4))
    return max(1, min(most, triton.cdiv(_TARGET_PROGRAMS, batch * num_kv_heads), 64))


def _check_pool(k_pool: torch.Tensor, v_pool: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape or v_pool.stride() != k_pool.stride():
        raise ValueError(f"paged pools are [num_blocks, block_size, Hkv, D], alike; got {tuple(k_pool.shape)} and "
                         f"{tuple(v_pool.shape)}")
    if k_pool.stride(-1) != 1 or k_pool.stride(-2) != k_pool.shape[-1]:
        raise ValueError(f"the paged kernel needs rows of contiguous elements, got strides {k_pool.stride()}")
    bs = k_pool.shape[1]
    if bs & (bs - 1):
        raise ValueError(f"the block size must be a power of two, got {bs}")
    if scales is None:
        if k_pool.dtype in QMAX:
            raise ValueError("a pool of int8 or float8 codes needs its scales")
        return
    if k_pool.dtype not in QMAX or v_pool.dtype != k_pool.dtype:
        raise ValueError(f"a quantized pool holds int8 or float8_e4m3fn codes, got {k_pool.dtype}")
    ks, vs = scales
    if ks.shape != k_pool.shape[:3] or vs.shape != ks.shape or vs.stride() != ks.stride() or ks.stride(-1) != 1:
        raise ValueError("the scales of a quantized pool are [num_blocks, block_size, Hkv], alike, contiguous heads")


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, seq_lens: torch.Tensor,
                 block_tables: torch.Tensor, *, cu_q: torch.Tensor | None = None, sliding_window: int | None = None,
                 sinks: int = 0, alibi: torch.Tensor | None = None,
                 scales: tuple[torch.Tensor, torch.Tensor] | None = None, out: torch.Tensor | None = None,
                 splits: int | None = None, block_n: int = BLOCK_N, num_warps: int = 4,
                 num_stages: int = 3) -> torch.Tensor:
    """Attention of each sequence's last query over its keys 0 .. seq_lens[b] - 1.

    ``q`` [N, Hq, D] (rotated; rows of D contiguous elements, any row and head strides: e.g. a view of a fused
    q/k/v projection). Without ``cu_q``, N is the batch size B and row b is sequence b's query; with ``cu_q``
    (int32 [B+1], device: sequence b's rows are cu_q[b] .. cu_q[b+1]-1) only each sequence's last row is
    computed, written into ``out`` (given, or a new contiguous [N, Hq, D] whose other rows are left unset).
    ``seq_lens`` int32 [B] and ``block_tables`` int32 [B, W] on the device; ``alibi``: float32 slopes [Hq];
    ``scales``: a quantized pool's float32 key and value scales [num_blocks, block_size, Hkv]. The grid depends
    on B and W only (graph-friendly). ``splits``, ``block_n``, ``num_warps``, ``num_stages``: launch shape.
    Returns ``out`` in q's dtype.
    """
    n, hq, d = q.shape
    nb, bs, hkv, _ = k_pool.shape
    b, width = block_tables.shape
    if cu_q is None and n != b:
        raise ValueError(f"paged decode without cu_q takes one query per sequence: {n} rows for {b} sequences")
    if hq % hkv or q.stride(-1) != 1:
        raise ValueError("queries are [N, Hq, D] with contiguous rows and Hq a multiple of Hkv")
    _check_pool(k_pool, v_pool, scales)
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32 or not block_tables.is_contiguous():
        raise ValueError("seq_lens and block_tables are contiguous int32 tensors")
    group = hq // hkv
    splits = splits or num_splits(b, hkv, width * bs)
    part = torch.empty((b, hq, splits, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((b, hq, splits, 2), dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif not out.is_contiguous() or out.shape != q.shape:
        raise ValueError("the output is a contiguous [N, Hq, D] tensor")
    block_d = max(16, _pow2(d))   # tl.dot needs K >= 16
    quant = scales is not None
    ks, vs = scales if quant else (q, q)
    cu = cu_q if cu_q is not None else seq_lens
    _split_k[(b, hkv, splits)](q, k_pool, v_pool, ks, vs, seq_lens, block_tables, cu,
                               alibi if alibi is not None else q, part, ml, d**-0.5, width, q.stride(0), q.stride(1),
                               k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), ks.stride(0) if quant else 0,
                               ks.stride(1) if quant else 0, HQ=hq, GROUP=group, BLOCK_G=max(16, _pow2(group)), D=d,
                               BLOCK_D=block_d, BS=bs, SPLITS=splits, BLOCK=block_n, WINDOW=sliding_window or 0,
                               SINKS=sinks, HAS_ALIBI=alibi is not None, HAS_CU=cu_q is not None,
                               PREC="ieee" if q.dtype == torch.float32 else "tf32", PIPELINE=not _INTERPRET,
                               QUANT=quant, num_warps=num_warps, num_stages=num_stages)
    _merge[(b, hq)](part, ml, out, cu, HQ=hq, D=d, BLOCK_D=block_d, SPLITS=splits, BLOCK_S=max(2, _pow2(splits)),
                    HAS_CU=cu_q is not None)
    return out


def attend_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, cu_q: torch.Tensor,
                  seq_lens: torch.Tensor, block_tables: torch.Tensor, max_q: int, sliding_window: int | None,
                  alibi: torch.Tensor | None, sinks: int, scales: tuple[torch.Tensor, torch.Tensor] | None, *,
                  chunks: ChunkPath) -> torch.Tensor:
    """The ``triton`` backend of :func:`~chatcore.layers.paged_attention.attend_paged` (its arguments, in order).

    A decode-only batch (``max_q == 1``: one row per sequence) is one :func:`paged_decode`, nothing read on the
    host. Otherwise every sequence's last row goes through :func:`paged_decode` too, and each sequence with
    several rows (a prompt chunk) is handed to ``chunks`` (the per-sequence gather path, called with that
    sequence alone), which overwrites its rows; ``cu_q`` is read on the host once."""
    slopes = None if alibi is None else alibi.to(device=q.device, dtype=torch.float32)
    if max_q == 1 and q.shape[0] == block_tables.shape[0]:
        return paged_decode(q, k_pool, v_pool, seq_lens, block_tables, sliding_window=sliding_window, sinks=sinks,
                            alibi=slopes, scales=scales)
    out = paged_decode(q, k_pool, v_pool, seq_lens, block_tables, cu_q=cu_q, sliding_window=sliding_window,
                       sinks=sinks, alibi=slopes, scales=scales)
    bounds = cu_q.tolist()
    for b in range(block_tables.shape[0]):
        lo, hi = bounds[b], bounds[b + 1]
        if hi - lo > 1:
            cu = torch.tensor([0, hi - lo], dtype=torch.int32, device=cu_q.device)
            out[lo:hi] = chunks(q[lo:hi], k_pool, v_pool, cu, seq_lens[b: b + 1], block_tables[b: b + 1], hi - lo,
                                sliding_window, slopes, sinks, scales)
    return out
