"""The project's own FlashAttention-2 forward kernel (Triton) for prompt chunks with ALiBi or a sliding window.

Prefill attention of T new queries of one sequence over the S = q_offset + T keys in the KV cache, in
:mod:`chatcore.layers.attention`'s layout: q [T, Hq, D], k/v head-major [Hkv, S, D] (possibly views of the
cache, whose head stride is capacity * D). Causal and bottom-right aligned (query i sits at position
q_offset + i), GQA, ALiBi (``slope[h] * (j - (q_offset + i))`` added to the scores) and a sliding window
(query i sees keys q_offset + i - window < j <= q_offset + i).

``_forward``: grid (Hq, query tiles, splits); one program computes BLOCK_M queries of one head with an online softmax
over BLOCK_N-key tiles (``tl.dot`` on the tensor cores, float32 accumulation, exp2). The query heads of one
KV head run next to each other, so their key and value loads hit L2; query tiles run heaviest first (the
last tiles see the most keys). A program visits only the key tiles that some row of its tile can see, from the
first key its first row's window reaches to its last row's position, in two loops: first the tiles every row
sees whole (no mask at all: the bulk of the work), then, masked, the tiles at the window's old edge and those
on the causal diagonal (one loop for both: two masked loops make ptxas serialise the wgmma instructions on an
H100, warning C7515). ALiBi needs no table: the bias is computed from the indices in the loop.

Split-KV: a short chunk on a long cache (a chat turn of a few hundred tokens on a 32k history) makes only a
few (head, query tile) programs, each with a long key range, and would leave most of the GPU idle; then
(:func:`num_splits`) the grid gains a third axis that cuts each tile's unmasked key range in parts, each
program writes its unnormalised sums with their row max and sum, and ``_merge`` combines them (log-sum-exp
weights), one program per query row and head.

The loop bounds come from program ids and host scalars only, nothing read from memory. Compiled, each loop
is a ``tl.range`` loop, which Triton software-pipelines; Triton's CPU interpreter (``TRITON_INTERPRET=1``,
the tests in CI) cannot take a run-time tensor as a ``range`` bound (it needs a 0-d array; scalars arrive as
1-element ones), so there the same steps run as ``while`` loops; and as its ``tl.dot`` multiplies bfloat16
bit patterns as integers, there bfloat16 tiles go through the dot as float32 (values rounded to bfloat16 first,
so the results are those of the compiled kernel up to summation order).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634


@triton.jit
def _tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, rows_pos, slope, origin, qk_scale, offs_n, d_ok, stride_kn,
          stride_vn, window, seqlen, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
          EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One BLOCK_N step of the online softmax (base 2) over keys start .. start + BLOCK_N - 1."""
    cols = start + offs_n
    if MASKED:
        col_ok = cols < seqlen
        if EVEN_D:
            kv_mask = col_ok[:, None]
        else:
            kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs + start * stride_kn, mask=kv_mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs + start * stride_kn)
    else:
        k = tl.load(k_ptrs + start * stride_kn, mask=d_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if HAS_ALIBI:   # slope * (j - origin), in base 2: one add per score (see _forward)
        s += (slope * (cols - origin).to(tl.float32))[None, :]
    if MASKED:
        visible = cols[None, :] <= rows_pos[:, None]
        if HAS_WINDOW:
            visible &= cols[None, :] > rows_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row that has seen nothing yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs + start * stride_vn, mask=kv_mask, other=0.0)
    elif EVEN_D:
        v = tl.load(v_ptrs + start * stride_vn)
    else:
        v = tl.load(v_ptrs + start * stride_vn, mask=d_ok[None, :], other=0.0)
    p = p.to(v_ptrs.dtype.element_ty)   # P @ V on the tensor cores in the input dtype, as flash-attn does
    if UPCAST:
        p, v = p.to(tl.float32), v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _run(acc, m_i, l_i, q, k_ptrs, v_ptrs, lo, n_lo, lo2, n, rows_pos, slope, origin, qk_scale, offs_n, d_ok, stride_kn,
         stride_vn, window, seqlen, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
         HAS_ALIBI: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr, PIPELINE: tl.constexpr,
         UPCAST: tl.constexpr):
    """``n`` key tiles: the first ``n_lo`` from ``lo`` on, the rest from ``lo2`` on (one loop for two runs)."""
    if PIPELINE:   # compiled: a counted loop, which Triton software-pipelines (loads run ahead of the math)
        for i in tl.range(0, n):
            start = tl.where(i < n_lo, lo + i * BLOCK_N, lo2 + (i - n_lo) * BLOCK_N)
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, rows_pos, slope, origin, qk_scale, offs_n,
                                  d_ok, stride_kn, stride_vn, window, seqlen, MASKED, HAS_WINDOW, HAS_ALIBI, EVEN_D,
                                  PREC, UPCAST)
    else:   # Triton's CPU interpreter takes no run-time tensor as a range() bound: the same steps
        i = 0
        while i < n:
            start = tl.where(i < n_lo, lo + i * BLOCK_N, lo2 + (i - n_lo) * BLOCK_N)
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, rows_pos, slope, origin, qk_scale, offs_n,
                                  d_ok, stride_kn, stride_vn, window, seqlen, MASKED, HAS_WINDOW, HAS_ALIBI, EVEN_D,
                                  PREC, UPCAST)
            i += 1
    return acc, m_i, l_i


@triton.jit
def _forward(q_ptr, k_ptr, v_ptr, o_ptr, slopes_ptr, part_ptr, ml_ptr, qk_scale, q_offset, seqlen_q, window,
             stride_qt, stride_qh, stride_kh, stride_kn, stride_vh, stride_vn, stride_ot, stride_oh,
             GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
             PREC: tl.constexpr, PIPELINE: tl.constexpr, UPCAST: tl.constexpr):
    head = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)   # heaviest tiles first
    split = tl.program_id(2)
    kv_head = head // GROUP
    m0 = tile * BLOCK_M
    seqlen = q_offset + seqlen_q

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    EVEN_D: tl.constexpr = D == BLOCK_D
    row_ok = offs_m < seqlen_q
    rows_pos = q_offset + offs_m

    q_ptrs = q_ptr + offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    if EVEN_D:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = k_ptr + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_ptr + kv_head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]

    # the key tiles this query tile needs: [start, end), of which [lo_full, hi_full) every row sees whole
    first = q_offset + m0                                   # position of the tile's first query
    last = q_offset + tl.minimum(m0 + BLOCK_M, seqlen_q) - 1  # ... and of its last real one
    end = last + 1
    hi_full = (first + 1) // BLOCK_N * BLOCK_N              # keys below are at or before every row's position
    if HAS_WINDOW:
        start = tl.maximum(first - window + 1, 0) // BLOCK_N * BLOCK_N
        lo_full = tl.minimum(tl.cdiv(tl.maximum(last - window + 1, 0), BLOCK_N) * BLOCK_N, end)
    else:
        start = 0
        lo_full = 0
    hi_full = tl.maximum(hi_full, lo_full)

    # ALiBi adds slope * (j - position) to row i's scores; softmax ignores a constant per row, so the kernel adds
    # slope * (j - middle) instead, one vector for every row of the tile, one add per score (flash-attn adds
    # slope * j for the same reason; measured from the tile's middle row, the bias stays small where the
    # weights are large, within slope * BLOCK_M / 2, and keeps float32's precision)
    middle = first + BLOCK_M // 2
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + head) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # the unmasked tiles, split evenly across SPLITS programs (split-KV, for a short chunk on a long cache)
    n_full = (hi_full - lo_full) // BLOCK_N
    per = tl.cdiv(n_full, SPLITS)
    lo_mine = lo_full + split * per * BLOCK_N
    n_mine = tl.minimum(tl.maximum(n_full - split * per, 0), per)
    acc, m_i, l_i = _run(acc, m_i, l_i, q, k_ptrs, v_ptrs, lo_mine, n_mine, lo_mine, n_mine, rows_pos, slope, middle,
                         qk_scale, offs_n, d_ok, stride_kn, stride_vn, window, seqlen, BLOCK_N, False, HAS_WINDOW,
                         HAS_ALIBI, EVEN_D, PREC, PIPELINE, UPCAST)   # every row sees every key: no mask
    # then, masked, the window's old edge (keys some rows no longer see) and the causal diagonal, as one loop,
    # in the last split (the one with the fewest unmasked tiles)
    n_edge = tl.cdiv(lo_full - start, BLOCK_N)
    n_masked = tl.where(split == SPLITS - 1, n_edge + tl.cdiv(end - hi_full, BLOCK_N), 0)
    acc, m_i, l_i = _run(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, n_edge, hi_full, n_masked, rows_pos, slope, middle,
                         qk_scale, offs_n, d_ok, stride_kn, stride_vn, window, seqlen, BLOCK_N, True, HAS_WINDOW,
                         HAS_ALIBI, EVEN_D, PREC, PIPELINE, UPCAST)

    if SPLITS == 1:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)   # padding rows past T see nothing; never stored
        out = acc / l_i[:, None]
        o_ptrs = o_ptr + offs_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
        if EVEN_D:
            tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:   # this split's unnormalised sums and its (max, sum) per row, for _merge: [SPLITS, T, Hq, ...]
        rows = (split * seqlen_q + offs_m) * tl.num_programs(0) + head
        tl.store(part_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(ml_ptr + rows * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + rows * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge(part_ptr, ml_ptr, o_ptr, rows_total, stride_ot, stride_oh, HQ: tl.constexpr, D: tl.constexpr,
           BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    """One query row and head: the splits' partial results weighted by their log-sum-exp (base 2)."""
    row = tl.program_id(0)   # token * HQ + head
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < SPLITS
    at = offs_s * rows_total + row
    m = tl.load(ml_ptr + at * 2, mask=s_ok, other=float("-inf"))
    ll = tl.load(ml_ptr + at * 2 + 1, mask=s_ok, other=0.0)
    w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - tl.max(m, 0)))
    part = tl.load(part_ptr + at[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.sum(ll * w, 0)
    tl.store(o_ptr + (row // HQ) * stride_ot + (row % HQ) * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < D)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_shape(d: int) -> tuple[int, int, int, int]:
    """Default (block_m, block_n, num_warps, num_stages) for head dim ``d``: shapes that compile for an H100
    (sm_90) to wgmma without register spills (``bench/prefill_kernels.py --ptxas``, ALiBi and a window on)."""
    if d <= 64:
        return 128, 128, 8, 3
    if d <= 128:
        return 128, 64, 8, 3
    return 64, 32, 4, 2


def num_splits(programs: int, key_tiles: int, device: torch.device) -> int:
    """Splits of the key range per query tile: 1 when the (head, query tile) programs fill the GPU, else enough
    to fill it once (a short chunk on a long cache), with at least 4 key tiles per split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, programs), key_tiles // 4, 32))


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, *,
                      sliding_window: int | None = None, alibi: torch.Tensor | None = None, block_m: int | None = None,
                      block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                      splits: int | None = None) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] (positions q_offset ..) over k/v [Hkv, q_offset + T, D]; [T, Hq, D].

    ``sliding_window``: sliding-window size (None: full attention); ``alibi``: float32 slopes [Hq] on q's device.
    ``block_m``, ``block_n``, ``num_warps``, ``num_stages``: launch shape (None: :func:`launch_shape`);
    ``splits``: split-KV factor (None: :func:`num_splits`; above 1 a second kernel merges the partial results).
    k and v may be strided views of a cache (rows of D contiguous elements); q must be [T, Hq, D] with
    contiguous rows.
    """
    t, hq, d = q.shape
    hkv, s, _ = k.shape
    if s != q_offset + t or v.shape != k.shape or hq % hkv:
        raise ValueError(f"prefill attention needs k/v [Hkv, q_offset + T, D] and Hq % Hkv == 0; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, q_offset {q_offset}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"triton prefill kernel needs contiguous rows of {name}, got strides {x.stride()}")
    dm, dn, dw, ds = launch_shape(d)
    block_m, block_n = block_m or dm, block_n or dn
    block_d = max(16, _pow2(d))   # tl.dot needs K >= 16
    tiles = triton.cdiv(t, block_m)
    splits = splits or num_splits(hq * tiles, triton.cdiv(min(s, sliding_window or s), block_n), q.device)
    out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    part = ml = out
    if splits > 1:
        part = torch.empty((splits, t, hq, block_d), dtype=torch.float32, device=q.device)
        ml = torch.empty((splits, t, hq, 2), dtype=torch.float32, device=q.device)
    if alibi is not None:
        alibi = alibi.to(device=q.device, dtype=torch.float32).contiguous()
    _forward[(hq, tiles, splits)](
        q, k, v, out, alibi if alibi is not None else q, part, ml, d**-0.5 * _LOG2E, q_offset, t, sliding_window or 0,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=hq // hkv, D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, SPLITS=splits,
        HAS_WINDOW=sliding_window is not None, HAS_ALIBI=alibi is not None,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", PIPELINE=not _INTERPRET,
        UPCAST=_INTERPRET and q.dtype == torch.bfloat16, num_warps=num_warps or dw, num_stages=num_stages or ds)
    if splits > 1:
        _merge[(t * hq,)](part, ml, out, t * hq, out.stride(0), out.stride(1), HQ=hq, D=d, BLOCK_D=block_d,
                          SPLITS=splits, BLOCK_S=max(2, _pow2(splits)))
    return out
