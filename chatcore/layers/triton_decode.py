"""The project's own FlashAttention-style decode kernels (Triton), for GPUs without flash-attn.

One decode step of one sequence over a static, head-major KV cache ([Hkv, capacity, D] per layer), in two
launches:

1. ``_split_k``: split-K attention, grid (kv heads, splits): each program takes one KV head's whole query
   group (GQA rows share every key load) over one slice of the sequence, with an online softmax, ALiBi,
   a sliding window and attention sinks (the first ``sinks`` keys stay visible beside the window). Given the
   new token's key and value (the static-cache decode mode), it also does what a separate rotate-and-append
   launch did: every program rotates its group's query rows in registers (RoPE, the half-split layout, at the
   position read from device memory), and the one program per KV head whose slice covers that position
   rotates the new key, writes key and value into the cache there, and attends to them from registers. No
   program reads the cache row at the position (the others' slices end before it), so no program waits on
   another's write;
2. ``_merge``: combines the splits' partial results (log-sum-exp weights), one program per query head.

A quantized cache (int8 or float8 e4m3 codes, a float32 scale per token and head:
:mod:`chatcore.layers.kv_quant`) is read as codes and scales: a key tile's scores are ``q . codes`` times the
keys' scales, and the probabilities are multiplied by the values' scales before their product with the value
codes, so the codes go to the tensor cores as they are (converted to q's dtype, exactly) and no tile is
dequantized. The program that appends the new token quantizes its key and value (the row's amax, scale and
codes, as :func:`~chatcore.layers.kv_quant.quantize` computes them) and attends to them as the cache holds
them. Under Triton's CPU interpreter, whose float-to-e4m3 conversion rounds wrongly (a carry out of the
mantissa is lost: 127.5 becomes 64), the kernel rounds to the e4m3 grid itself before converting.

The sequence length is read from device memory, never from the host, and the grid depends only on the
cache's capacity, so a decode step made of these launches can be captured in a CUDA graph and replayed at
any length. ``TRITON_INTERPRET=1`` runs the same kernels on the CPU (the tests do, in CI).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from chatcore.layers.kv_quant import QMAX

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_GRID_ROUNDING = _INTERPRET   # e4m3 codes rounded in-kernel (the interpreter's conversion is wrong); see _quantize

BLOCK_N = 64           # keys per inner step
_TARGET_PROGRAMS = 132  # one wave of an H100's multiprocessors (bench/gpu_profile.py --sweep; bench/README.md)


@triton.jit
def online_softmax_step(acc, m_i, l_i, q, k, v, k_scale, v_scale, ok, cols, last, slopes, scale,
                        HAS_ALIBI: tl.constexpr, PREC: tl.constexpr, QUANT: tl.constexpr):
    """One step of the online softmax of queries ``q`` [G, D] over a tile of keys ``k`` / values ``v`` [N, D]
    at positions ``cols`` (``ok``: visible), the query at ``last``; QUANT: ``k``/``v`` are codes and
    ``k_scale``/``v_scale`` [N] their scales. Returns the updated (acc, m, l). Shared by the contiguous-cache
    kernel here and the paged one (:mod:`chatcore.layers.triton_paged`), which differ only in where a key is."""
    if QUANT:
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * (k_scale * scale)[None, :]
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    if HAS_ALIBI:
        s += slopes[:, None] * (cols - last).to(tl.float32)[None, :]
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    if QUANT:   # sum_j p_j (c_j s_j) = sum_j (p_j s_j) c_j
        acc = acc * alpha[:, None] + tl.dot((p * v_scale[None, :]).to(q.dtype), v.to(q.dtype), input_precision=PREC)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, m_new, l_i


@triton.jit
def _attend_block(acc, m_i, l_i, q, kc_ptr, vc_ptr, ks_ptr, vs_ptr, kv_head, start, lo_visible, hi, last, slopes,
                  scale, offs_n, offs_d, head_stride, scale_stride, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, PREC: tl.constexpr, QUANT: tl.constexpr):
    """One BLOCK_N step over keys start .. start+BLOCK_N-1 of the cache (visible: lo_visible..hi-1);
    QUANT: the caches hold codes, ``ks_ptr``/``vs_ptr`` their scales."""
    cols = start + offs_n
    ok = (cols >= lo_visible) & (cols < hi)
    base = kv_head * head_stride + cols[:, None] * D + offs_d[None, :]
    dmask = offs_d[None, :] < D
    k = tl.load(kc_ptr + base, mask=ok[:, None] & dmask, other=0.0)
    v = tl.load(vc_ptr + base, mask=ok[:, None] & dmask, other=0.0)
    k_scale = scale
    v_scale = scale
    if QUANT:
        k_scale = tl.load(ks_ptr + kv_head * scale_stride + cols, mask=ok, other=0.0)
        v_scale = tl.load(vs_ptr + kv_head * scale_stride + cols, mask=ok, other=0.0)
    return online_softmax_step(acc, m_i, l_i, q, k, v, k_scale, v_scale, ok, cols, last, slopes, scale, HAS_ALIBI,
                               PREC, QUANT)


@triton.jit
def _quantize(x, QMAX: tl.constexpr, IS_INT: tl.constexpr, GRID: tl.constexpr):
    """Rows x [R, BLOCK_D] (float32, zero padding) -> (their codes as float32 values, float32 scales [R]):
    kv_quant.quantize's operations up to the codes' last rounding. int8: on the integer grid. e4m3: on its grid
    only with GRID (the CPU interpreter, whose conversion loses mantissa carries); without it the conversion to
    the cache dtype rounds them, so the caller attends to the converted codes, never to these values."""
    amax = tl.max(tl.abs(x), 1)
    scale = amax / QMAX
    y = x / tl.where(scale > 0, scale, 1.0)[:, None]
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if IS_INT:
        y = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int32).to(tl.float32)   # half away from zero
    elif GRID:
        # e4m3: 3 mantissa bits, exponents from -6 (below: subnormal steps of 2^-9); round to nearest even
        expo = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        step = ((tl.maximum(expo, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
        r = y / step
        r = (r + 12582912.0) - 12582912.0   # 1.5 * 2^23: rounds |r| < 2^22 to an integer, ties to even
        y = r * step
    return y, scale


@triton.jit
def _rotate(ptr, rows, row_ok, offs_d, cos_ptr, sin_ptr, pos, D: tl.constexpr, HALF: tl.constexpr,
            HAS_ROPE: tl.constexpr):
    """Rows ``rows`` of a [rows, D] tensor as a [len(rows), BLOCK_D] tile, rotated at ``pos`` if HAS_ROPE
    (half-split RoPE: x1 * cos - x2 * sin, x2 * cos + x1 * sin, in float32 with float32 cos/sin tables
    [positions, HALF]) and rounded back to the tensor's dtype, as a rotation stored in memory would be."""
    d_ok = offs_d < D
    mask = row_ok[:, None] & d_ok[None, :]
    x = tl.load(ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    if HAS_ROPE:
        first = offs_d < HALF
        partner = tl.where(first, offs_d + HALF, offs_d - HALF)    # the other half's element of each pair
        freq = tl.where(first, offs_d, offs_d - HALF)
        cos = tl.load(cos_ptr + pos * HALF + freq, mask=d_ok, other=0.0)
        sin = tl.load(sin_ptr + pos * HALF + freq, mask=d_ok, other=0.0)
        sin = tl.where(first, -sin, sin)
        other = tl.load(ptr + rows[:, None] * D + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) * cos[None, :] + other * sin[None, :]).to(x.dtype)
    return x


@triton.jit
def _split_k(q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, pos_ptr, slopes_ptr, part_ptr, ml_ptr, k_ptr, v_ptr, cos_ptr,
             sin_ptr, scale, head_stride, scale_stride, HQ: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
             D: tl.constexpr,
             HALF: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr, WINDOW: tl.constexpr,
             SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, PREC: tl.constexpr, PIPELINE: tl.constexpr,
             HAS_NEW: tl.constexpr, HAS_ROPE: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
             IS_INT: tl.constexpr, GRID: tl.constexpr):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    last = tl.load(pos_ptr)                       # position of the newest token
    seqlen = last + 1
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(seqlen - WINDOW, 0)
    per = tl.cdiv(tl.cdiv(seqlen - lo, SPLITS), BLOCK) * BLOCK
    start = lo + split * per
    end = tl.minimum(start + per, seqlen)
    if HAS_NEW:   # the newest key comes from registers (below), not from the cache: every slice ends before it
        end = tl.minimum(start + per, last)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK)
    rows = kv_head * GROUP + offs_g
    row_ok = offs_g < GROUP
    q = _rotate(q_ptr, rows, row_ok, offs_d, cos_ptr, sin_ptr, last, D, HALF, HAS_ROPE)   # in registers only
    slopes = tl.zeros([BLOCK_G], dtype=tl.float32)
    if HAS_ALIBI:
        slopes = tl.load(slopes_ptr + rows, mask=row_ok, other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    if SINKS > 0:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if split == 0:   # keys the window hides but the sinks keep: 0 .. min(SINKS, lo)-1
            sink_end = tl.minimum(lo, SINKS)
            s0 = 0
            while s0 < sink_end:
                acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, kc_ptr, vc_ptr, ks_ptr, vs_ptr, kv_head, s0, 0,
                                              sink_end, last, slopes, scale, offs_n, offs_d, head_stride,
                                              scale_stride, D, BLOCK_D, HAS_ALIBI, PREC, QUANT)
                s0 += BLOCK
    if PIPELINE:   # compiled: a counted loop, which Triton software-pipelines (loads run ahead of the math)
        for it in tl.range(0, tl.cdiv(end - start, BLOCK)):
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, kc_ptr, vc_ptr, ks_ptr, vs_ptr, kv_head,
                                          start + it * BLOCK, start, end, last, slopes, scale, offs_n, offs_d,
                                          head_stride, scale_stride, D, BLOCK_D, HAS_ALIBI, PREC, QUANT)
    else:   # Triton's CPU interpreter cannot take a loop bound read from memory in range(): the same steps
        s0 = start
        while s0 < end:
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, kc_ptr, vc_ptr, ks_ptr, vs_ptr, kv_head, s0, start,
                                          end, last, slopes, scale, offs_n, offs_d, head_stride, scale_stride, D,
                                          BLOCK_D, HAS_ALIBI, PREC, QUANT)
            s0 += BLOCK
    if HAS_NEW:
        # the slice that covers the newest position (exactly one per KV head) appends the new key and value
        # and attends to them here; the others compute the same and mask it out (no branch, no extra loads
        # that matter: one row each)
        covers = (start <= last) & (last < start + per)
        one = tl.arange(0, 1)
        k = _rotate(k_ptr, kv_head + one, one < 1, offs_d, cos_ptr, sin_ptr, last, D, HALF, HAS_ROPE)
        v = tl.load(v_ptr + kv_head * D + one[:, None] * D + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)
        cache_row = kv_head * head_stride + last * D + one[:, None] * D + offs_d[None, :]
        # a tensor mask built by comparison (Triton 3.9's interpreter refuses a scalar flag broadcast by &)
        write = (offs_d[None, :] + tl.where(covers, 0, BLOCK_D)) < D
        if QUANT:   # quantize the row as it goes in: its amax, scale and codes
            k_codes, k_scale = _quantize(k.to(tl.float32), QMAX, IS_INT, GRID)
            v_codes, v_scale = _quantize(v.to(tl.float32), QMAX, IS_INT, GRID)
            # the codes in the cache's dtype: on the GPU this conversion is e4m3's rounding (GRID is off there)
            k_codes, v_codes = k_codes.to(kc_ptr.dtype.element_ty), v_codes.to(vc_ptr.dtype.element_ty)
            tl.store(kc_ptr + cache_row, k_codes, mask=write)
            tl.store(vc_ptr + cache_row, v_codes, mask=write)
            scale_at = kv_head * scale_stride + last + one
            write_scale = (one + tl.where(covers, 0, 1)) < 1
            tl.store(ks_ptr + scale_at, k_scale, mask=write_scale)
            tl.store(vs_ptr + scale_at, v_scale, mask=write_scale)
            k = k_codes.to(tl.float32) * k_scale[:, None]    # attend to the row as the cache holds it: the
            vv = v_codes.to(tl.float32) * v_scale[:, None]   # stored codes, not the values before rounding
        else:
            tl.store(kc_ptr + cache_row, k.to(kc_ptr.dtype.element_ty), mask=write)
            tl.store(vc_ptr + cache_row, v.to(vc_ptr.dtype.element_ty), mask=write)
            k = k.to(kc_ptr.dtype.element_ty).to(tl.float32)    # attend to the key as the cache holds it
            vv = v.to(vc_ptr.dtype.element_ty)
        s = tl.sum(q.to(tl.float32) * k, 1) * scale      # ALiBi's bias at the newest position is 0
        s = tl.where(covers & row_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe)
        alpha = tl.exp(m_i - m_safe)
        if QUANT:
            acc = acc * alpha[:, None] + p[:, None] * vv
        else:
            p_v = p.to(vv.dtype).to(tl.float32)   # the probability rounded as the cache blocks' dot rounds it
            acc = acc * alpha[:, None] + p_v[:, None] * vv.to(tl.float32)
        l_i = l_i * alpha + p
        m_i = m_new
    out = part_ptr + (rows[:, None] * SPLITS + split) * D + offs_d[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(ml_ptr + (rows * SPLITS + split) * 2, m_i, mask=row_ok)
    tl.store(ml_ptr + (rows * SPLITS + split) * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge(part_ptr, ml_ptr, out_ptr, D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
           BLOCK_S: tl.constexpr):
    head = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < SPLITS
    m = tl.load(ml_ptr + (head * SPLITS + offs_s) * 2, mask=s_ok, other=float("-inf"))
    ll = tl.load(ml_ptr + (head * SPLITS + offs_s) * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
    part = tl.load(part_ptr + (head * SPLITS + offs_s)[:, None] * D + offs_d[None, :],
                   mask=s_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.sum(ll * w, 0)
    tl.store(out_ptr + head * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < D)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check(*tensors: torch.Tensor) -> None:
    """The kernels index rows of D contiguous elements: [H, D] tensors and [H, positions, D] caches."""
    for t in tensors:
        if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
            raise ValueError(f"triton decode kernels need rows of contiguous elements, got strides {t.stride()}")


def num_splits(num_kv_heads: int, capacity: int) -> int:
    """Splits of the sequence per KV head: enough programs to fill the GPU at the cache's full length."""
    most = max(1, triton.cdiv(capacity, BLOCK_N * 4))
    return max(1, min(most, triton.cdiv(_TARGET_PROGRAMS, num_kv_heads), 64))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, *,
                     new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                     rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                     sliding_window: int | None = None, sinks: int = 0, alibi: torch.Tensor | None = None,
                     scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                     splits: int | None = None, block_n: int = BLOCK_N, num_warps: int = 4,
                     num_stages: int = 3) -> torch.Tensor:
    """Attention of one query [Hq, D] at position ``pos`` (int32 [1], device) over cache keys 0..pos.

    ``k_cache``/``v_cache``: [Hkv, capacity, D]. Without ``new_kv``, rows 0..pos are already written and ``q``
    is already rotated. With ``new_kv`` (the new token's key and value, [Hkv, D] each, key not rotated), rows
    0..pos-1 are written and the same launch rotates ``q`` (in registers: ``q`` is left as it is) and the key
    at ``pos`` with ``rotary`` (float32 cos/sin tables [positions, D/2]; None: no RoPE) and writes key and
    value into the caches at ``pos``. Returns [Hq, D] in q's dtype.
    ``scales``: a quantized cache's float32 key and value scales [Hkv, capacity] (rows of contiguous elements;
    the caches then hold int8 or float8_e4m3fn codes); a new key and value are appended quantized.
    ``splits``, ``block_n``, ``num_warps``, ``num_stages``: launch shape (defaults chosen on the H100).
    """
    hq, d = q.shape
    hkv, cap, _ = k_cache.shape
    group = hq // hkv
    splits = splits or num_splits(hkv, cap)
    if rotary is not None and new_kv is None:
        raise ValueError("rotary tables rotate the new key and the query: they come with new_kv")
    k_new, v_new = new_kv if new_kv is not None else (q, q)
    cos, sin = rotary if rotary is not None else (q, q)
    part = torch.empty((hq, splits, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((hq, splits, 2), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    block_d = max(16, _pow2(d))   # tl.dot needs K >= 16
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _check(q, k_cache, v_cache, k_new, v_new)
    quant = scales is not None
    if quant:
        if k_cache.dtype not in QMAX or v_cache.dtype != k_cache.dtype:
            raise ValueError(f"a quantized cache holds int8 or float8_e4m3fn codes, got {k_cache.dtype}")
        if any(x.stride(-1) != 1 or x.stride(0) != scales[0].stride(0) or x.shape != k_cache.shape[:2]
               for x in scales):
            raise ValueError("the scales of a quantized cache are [Hkv, capacity] with contiguous rows")
    elif k_cache.dtype in QMAX:
        raise ValueError("a cache of int8 or float8 codes needs its scales")
    k_scale, v_scale = scales if scales is not None else (q, q)
    _split_k[(hkv, splits)](q, k_cache, v_cache, k_scale, v_scale, pos, alibi if alibi is not None else q, part, ml,
                            k_new, v_new, cos, sin, d**-0.5, k_cache.stride(0), k_scale.stride(0) if quant else 0,
                            HQ=hq, GROUP=group, BLOCK_G=max(16, _pow2(group)),
                            D=d, HALF=d // 2, BLOCK_D=block_d, SPLITS=splits, BLOCK=block_n, WINDOW=sliding_window or 0,
                            SINKS=sinks, HAS_ALIBI=alibi is not None, PREC=prec, PIPELINE=not _INTERPRET,
                            HAS_NEW=new_kv is not None, HAS_ROPE=rotary is not None, QUANT=quant,
                            QMAX=QMAX.get(k_cache.dtype, 1.0), IS_INT=k_cache.dtype == torch.int8,
                            GRID=_GRID_ROUNDING, num_warps=num_warps, num_stages=num_stages)
    _merge[(hq,)](part, ml, out, D=d, BLOCK_D=block_d, SPLITS=splits, BLOCK_S=max(2, _pow2(splits)))
    return out
