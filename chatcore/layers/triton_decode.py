"""The project's own FlashAttention-style decode kernels (Triton), for GPUs without flash-attn.

One decode step of one sequence over a static, head-major KV cache ([Hkv, capacity, D] per layer):

1. ``_rope_append``: rotates the new query and key at the position read from device memory (RoPE, the
   half-split layout), writes the new key and value into the cache at that position, one program per head;
2. ``_split_k``: split-K attention, grid (kv heads, splits): each program takes one KV head's whole query
   group (GQA rows share every key load) over one slice of the sequence, with an online softmax, ALiBi,
   a sliding window and attention sinks (the first ``sinks`` keys stay visible beside the window);
3. ``_merge``: combines the splits' partial results (log-sum-exp weights), one program per query head.

The sequence length is read from device memory, never from the host, and the grid depends only on the
cache's capacity, so a decode step made of these launches can be captured in a CUDA graph and replayed at
any length. ``TRITON_INTERPRET=1`` runs the same kernels on the CPU (the tests do, in CI).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

BLOCK_N = 64           # keys per inner step
_TARGET_PROGRAMS = 132  # one wave of an H100's multiprocessors (bench/gpu_profile.py --sweep: 8.7 -> 8.4 us at 4k)


@triton.jit
def _rope_append(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, head_stride,
                 HQ: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                 HAS_ROPE: tl.constexpr):
    head = tl.program_id(0)
    pos = tl.load(pos_ptr)
    offs = tl.arange(0, BLOCK_H)
    ok = offs < HALF
    if head < HQ:
        src = q_ptr + head * D
        dst = q_ptr + head * D
    else:
        src = k_ptr + (head - HQ) * D
        dst = kc_ptr + (head - HQ) * head_stride + pos * D
        vdst = vc_ptr + (head - HQ) * head_stride + pos * D
        vsrc = v_ptr + (head - HQ) * D
        tl.store(vdst + offs, tl.load(vsrc + offs, mask=ok), mask=ok)
        tl.store(vdst + HALF + offs, tl.load(vsrc + HALF + offs, mask=ok), mask=ok)
    x1 = tl.load(src + offs, mask=ok).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=ok).to(tl.float32)
    if HAS_ROPE:
        cos = tl.load(cos_ptr + pos * HALF + offs, mask=ok)
        sin = tl.load(sin_ptr + pos * HALF + offs, mask=ok)
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    tl.store(dst + offs, x1.to(dst.dtype.element_ty), mask=ok)
    tl.store(dst + HALF + offs, x2.to(dst.dtype.element_ty), mask=ok)


@triton.jit
def _attend_block(acc, m_i, l_i, q, kc_ptr, vc_ptr, kv_head, start, lo_visible, hi, last, slopes, scale,
                  offs_n, offs_d, head_stride, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, PREC: tl.constexpr):
    """One BLOCK_N step of the online softmax over keys start .. start+BLOCK_N-1 (visible: lo_visible..hi-1)."""
    cols = start + offs_n
    ok = (cols >= lo_visible) & (cols < hi)
    base = kv_head * head_stride + cols[:, None] * D + offs_d[None, :]
    dmask = offs_d[None, :] < D
    k = tl.load(kc_ptr + base, mask=ok[:, None] & dmask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    if HAS_ALIBI:
        s += slopes[:, None] * (cols - last).to(tl.float32)[None, :]
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    v = tl.load(vc_ptr + base, mask=ok[:, None] & dmask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, m_new, l_i


@triton.jit
def _split_k(q_ptr, kc_ptr, vc_ptr, pos_ptr, slopes_ptr, part_ptr, ml_ptr, scale, head_stride,
             HQ: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
             SPLITS: tl.constexpr, BLOCK: tl.constexpr, WINDOW: tl.constexpr,
             SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, PREC: tl.constexpr, PIPELINE: tl.constexpr):
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

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK)
    rows = kv_head * GROUP + offs_g
    row_ok = offs_g < GROUP
    q = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
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
                acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, kc_ptr, vc_ptr, kv_head, s0, 0, sink_end, last,
                                              slopes, scale, offs_n, offs_d, head_stride, D, BLOCK_D, HAS_ALIBI, PREC)
                s0 += BLOCK
    if PIPELINE:   # compiled: a counted loop, which Triton software-pipelines (loads run ahead of the math)
        for it in tl.range(0, tl.cdiv(end - start, BLOCK)):
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, kc_ptr, vc_ptr, kv_head, start + it * BLOCK, start, end,
                                          last, slopes, scale, offs_n, offs_d, head_stride, D, BLOCK_D, HAS_ALIBI,
                                          PREC)
    else:   # Triton's CPU interpreter cannot take a loop bound read from memory in range(): the same steps
        s0 = start
        while s0 < end:
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, kc_ptr, vc_ptr, kv_head, s0, start, end, last,
                                          slopes, scale, offs_n, offs_d, head_stride, D, BLOCK_D, HAS_ALIBI, PREC)
            s0 += BLOCK
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


def rope_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                pos: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> None:
    """In place: rotate q [Hq, D] and k [Hkv, D] at ``pos`` (int32 [1] on the device), write k, v into the
    caches [Hkv, capacity, D] at ``pos``. ``cos``/``sin``: float32 [positions, D/2] tables, or None (no RoPE)."""
    hq, d = q.shape
    hkv = k_cache.shape[0]
    _check(q, k, v, k_cache, v_cache)
    _rope_append[(hq + hkv,)](q, k, v, k_cache, v_cache, cos if cos is not None else q, sin if sin is not None else q,
                              pos, k_cache.stride(0), HQ=hq, D=d, HALF=d // 2, BLOCK_H=_pow2(d // 2),
                              HAS_ROPE=cos is not None)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, *,
                     window: int | None = None, sinks: int = 0, alibi: torch.Tensor | None = None,
                     splits: int | None = None, block_n: int = BLOCK_N, num_warps: int = 4,
                     num_stages: int = 3) -> torch.Tensor:
    """Attention of one query [Hq, D] at position ``pos`` (int32 [1], device) over cache keys 0..pos.

    ``k_cache``/``v_cache``: [Hkv, capacity, D] with rows 0..pos written; returns [Hq, D] in q's dtype.
    ``splits``, ``block_n``, ``num_warps``, ``num_stages``: launch shape (defaults chosen on the H100).
    """
    hq, d = q.shape
    hkv, cap, _ = k_cache.shape
    group = hq // hkv
    splits = splits or num_splits(hkv, cap)
    part = torch.empty((hq, splits, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((hq, splits, 2), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    block_d = max(16, _pow2(d))   # tl.dot needs K >= 16
    _check(q, k_cache, v_cache)
    _split_k[(hkv, splits)](q, k_cache, v_cache, pos, alibi if alibi is not None else q, part, ml, d**-0.5,
                            k_cache.stride(0), HQ=hq, GROUP=group, BLOCK_G=max(16, _pow2(group)), D=d, BLOCK_D=block_d,
                            SPLITS=splits, BLOCK=block_n, WINDOW=window or 0, SINKS=sinks,
                            HAS_ALIBI=alibi is not None, PREC="ieee" if q.dtype == torch.float32 else "tf32",
                            PIPELINE=not _INTERPRET, num_warps=num_warps, num_stages=num_stages)
    _merge[(hq,)](part, ml, out, D=d, BLOCK_D=block_d, SPLITS=splits, BLOCK_S=max(2, _pow2(splits)))
    return out
