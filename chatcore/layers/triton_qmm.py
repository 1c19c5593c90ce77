"""Matrix product with a packed weight for several rows (Triton, tensor cores): ``x [M, K] @ dequant(w).T (+ b)``.

The small-M counterpart of :mod:`chatcore.layers.triton_qgemv` (batched decode, prompt chunks): one kernel for
every :class:`~chatcore.quant.packed.QuantFormat` of the planar layout, the format entering as constexprs.
Each program computes the transposed output tile ``out.T [BLOCK_N, BLOCK_M] = W [BLOCK_N, BLOCK_K] @ x.T``
with ``tl.dot``: the dequantized weight tile is the dot's first operand (on sm_90 Triton makes it wgmma's
register operand after one pass through shared memory; x comes from shared memory), and M is padded to
BLOCK_M (>= 16, rows past M masked): one dequantization serves up to BLOCK_M rows.

Per weight the tile costs a few integer operations, one multiply-add and a rounding: a code ``c`` becomes the
float32 ``f = 1 + c / 2**bits`` by writing its bits under a float32 exponent (as in the GEMV), and with the
group's scale ``A`` and offset ``o`` (``+ m`` or ``- dmin * mn``) folded into ``A' = 2**bits * A`` and
``o' = o - (2**bits + zero) * A``, the value ``A * (code - zero) + o`` is one FMA ``A' * f + o'``, rounded once to
the activations' dtype: what :func:`~chatcore.layers.triton_dequant.dequantize_to` gives (the float32 result may
differ in its last bits, the FMA rounding once where the reference rounds thrice; the weight as rounded to
bfloat16 / float16 then agrees except at rounding ties). Formats with one scale per row (int8, fp8) multiply
exact codes (integers ``code - zero`` or the float8 values, which bfloat16 and float16 hold exactly) and apply the
row's scale (and offset times the sum of x) after the dot. For 4-6 bits one ``ql`` byte holds columns j and
j + 16 of a 32-column chunk: the tile's low nibbles and high nibbles are two half tiles, each its own dot
with the matching columns of x (no reordering of the weight). Codes are read as int32 words where their plane
lies on 4-byte boundaries (8 nibbles or 4 int8 codes a word; a code is then one shift and one mask-and-or under
the exponent, no byte extraction), else byte by byte.

Options: ``split_k`` programs per output tile each reduce a slice of K into a float32 workspace; the last of
them to finish (an atomic counter per tile, left at zero for the next call) sums the partials in split order,
so the result does not depend on which finished first, and runs the epilogues (one kernel). Epilogues: bias
(added in float32 before the rounding) and residual (added to the rounded product, then rounded: as
``residual + F.linear(x, w, b)``). Launch shapes come from :func:`mm_config`; ``config=`` overrides it (the
benchmark's sweep). Nothing reads the device from the host, so a call can be captured in a CUDA graph.

On the CPU (Triton's interpreter, whose bfloat16 ``tl.dot`` is wrong) both operands go to float32 after the
weight tile is rounded to x's dtype, and float32 x is multiplied in full float32 precision everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from chatcore.layers.triton_qgemv import _code_float, _group_scale, format_constants, plane_args, row_mode, tile_k
from chatcore.layers.triton_qmm_tiles import (
    _dot,
    _epilogue,
    _epilogue_silu,
    _fold,
    _row_scale,
    _row_values,
    _word_bytes,
    _word_half,
)
from chatcore.quant.packed import PackedWeight, QuantFormat


@dataclass(frozen=True)
class MMConfig:
    """A launch shape: activation rows, weight rows and columns per program and loop step (powers of two;
    block_m >= 16, block_n >= 16, block_k a multiple of the format's group and of 32), programs splitting K,
    warps, pipeline stages."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "split_k"):
            v = getattr(self, name)
            if v <= 0 or v & (v - 1):
                raise ValueError(f"MMConfig.{name} must be a power of two, got {v}")
        if self.block_m < 16 or self.block_n < 16 or self.block_k < 32:
            raise ValueError("MMConfig: block_m and block_n are at least 16, block_k at least 32 (tl.dot's tiles)")
        if self.num_warps <= 0 or self.num_stages <= 0:
            raise ValueError("MMConfig: warps and stages must be positive")


def rows_tile(m: int) -> int:
    """BLOCK_M for M rows: M rounded up to a power of two, 16 .. 128."""
    return min(max(16, triton.next_power_of_2(m)), 128)


PROGRAMS = 256   # programs a launch should make at least (the H200 has 132 SMs), splitting K if need be


def mm_config(m: int, n: int, k: int, fmt: QuantFormat, gate_up: bool = False) -> MMConfig:
    """The default launch shape for x [m, k] times an [n, k] weight of ``fmt`` (a first guess, before a GPU
    sweep): 64 weight rows x 256 columns a step, 4 warps (one warpgroup: Hopper's wgmma takes 64 rows; ptxas
    for sm_90 counts ~6 SASS instructions per 4-bit weight in the loop there, against ~9.5 with 32 rows, which
    fall back to mma.sync), 3 stages; K split (2, 4 or 8 ways) until the launch has about :data:`PROGRAMS`
    programs (narrow outputs at small M). ``gate_up`` (:func:`qmm_gate_up_silu`, n gate rows, each program
    reading as many up rows again): 8-bit codes step 128 columns (256 spill registers there). 128 activation
    rows step 128 columns in 2 stages: 256 columns in 3 stages ran out of shared memory on the H200 (M = 256)."""
    block_m = rows_tile(m)
    programs = triton.cdiv(n, 64) * triton.cdiv(m, block_m)
    split = 1
    while split < 8 and programs * split * 5 < PROGRAMS * 4:   # below 80% of the target
        split *= 2
    block_k = 128 if (gate_up and fmt.bits == 8) or block_m >= 128 else 256
    stages = 2 if block_m >= 128 else 3   # 128 rows x 256 columns x 3 stages overflowed the H200's shared memory
    return MMConfig(block_m=block_m, block_n=64, block_k=block_k, split_k=split, num_warps=4, num_stages=stages)


@triton.jit
def _qmm(x_ptr, out_ptr, b_ptr, res_ptr, part_ptr, cnt_ptr, M, N, K, K_SPLIT, s_xm, s_om, s_rm,
         ql_ptr, qh_ptr, q_ptr, d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr,
         s_ql, s_qh, s_q, s_d, s_sc, s_m, s_dmin, s_mn,
         BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr, ZERO: tl.constexpr,
         SUB_SCALE: tl.constexpr, OFFSET: tl.constexpr, FLOAT_CODES: tl.constexpr, ROW: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr,
         SPLIT: tl.constexpr, WORDS: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
         GATE_UP: tl.constexpr, DOT_F32: tl.constexpr):
    """out.T[rows, ms] for BLOCK_N weight rows and BLOCK_M activation rows over K columns k_start ..
    + K_SPLIT; SPLIT > 1: the float32 partial goes to part_ptr[program_id(2)], and the last of the tile's SPLIT
    programs (counted at cnt_ptr[tile]) adds the partials in split order and writes out. A tile is NG groups of
    GS columns (8 bits; one group in row mode) or NG 32-column chunks (4-6 bits). GATE_UP: the weight has 2N
    rows (gate, then up); each program also reduces the up rows N further, and out = silu(gate) * up."""
    rows_out = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(rows_out, N - 1).to(tl.int64)   # rows past N read row N - 1; their results are not stored
    ms = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = ms < M
    k_start = tl.program_id(2) * K_SPLIT
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    sx = tl.zeros([BLOCK_M], dtype=tl.float32)   # sum of x over the columns (a per-row offset's term)
    if BITS == 8:
        r3 = rows[:, None, None]
        kg = tl.arange(0, NG)[None, :, None] * GS + tl.arange(0, GS)[None, None, :]   # [1, NG, GS]
        kw = tl.arange(0, NG)[None, :, None] * (GS // 4) + tl.arange(0, GS // 4)[None, None, :]   # words
        kk = tl.arange(0, BLOCK_K)
    else:
        r3 = rows[:, None, None]
        c3 = tl.arange(0, NG)[None, :, None]
        j3 = tl.arange(0, 16)[None, None, :]
        kk = tl.arange(0, BLOCK_K // 2)
        kk = (kk // 16) * 32 + kk % 16                     # a half tile's columns: chunk * 32 + j
    for k0 in tl.range(k_start, k_start + K_SPLIT, BLOCK_K):
        for part in tl.static_range(1 + GATE_UP):   # the gate rows, then (GATE_UP) the up rows N further
            r3 = (rows + part * N)[:, None, None]
            if part == 0:
                cur = acc
            else:
                cur = acc_up
            if BITS == 8 and WORDS:   # int8 codes read as int32 words, 4 codes a word
                wq = tl.load(q_ptr + r3 * s_q + k0 // 4 + kw)   # [BN, NG, GS / 4]
                if ROW:   # exact code - zero: f * 256 - (256 + ZERO)
                    a = tl.full([1, 1, 1], 256.0, tl.float32)
                    off = tl.full([1, 1, 1], -(256.0 + ZERO), tl.float32)
                else:
                    g = k0 // GROUP + tl.arange(0, NG)[None, :, None]
                    a, off = _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn, r3, g,
                                          GROUP, BLOCK, SUB_SCALE, OFFSET)
                    a, off = _fold(a, off, BITS, ZERO, False)
                w = _word_bytes(wq, a, off, BLOCK_N, BLOCK_K).to(dt)
                xt = tl.load(x_ptr + ms[None, :] * s_xm + k0 + kk[:, None], mask=m_ok[None, :], other=0.0)
                cur = _dot(w, xt, cur, DOT_F32)
                if ROW and OFFSET != 0 and part == 0:
                    sx += tl.sum(xt.to(tl.float32), 0)
            elif BITS == 8:
                q = tl.load(q_ptr + r3 * s_q + k0 + kg)       # [BN, NG, GS]
                if FLOAT_CODES:
                    f = q.to(tl.float32)
                else:
                    f = _code_float(q.to(tl.int32) ^ 0x80, 8)
                if ROW:
                    v = _row_values(f, BITS, ZERO, FLOAT_CODES)
                else:
                    g = k0 // GROUP + tl.arange(0, NG)[None, :, None]
                    a, off = _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn, r3, g,
                                          GROUP, BLOCK, SUB_SCALE, OFFSET)
                    a, off = _fold(a, off, BITS, ZERO, FLOAT_CODES)
                    v = tl.fma(a, f, off)
                w = tl.reshape(v, [BLOCK_N, BLOCK_K]).to(dt)
                xt = tl.load(x_ptr + ms[None, :] * s_xm + k0 + kk[:, None], mask=m_ok[None, :], other=0.0)
                cur = _dot(w, xt, cur, DOT_F32)
                if ROW and OFFSET != 0 and part == 0:
                    sx += tl.sum(xt.to(tl.float32), 0)
            elif WORDS:   # 4-6-bit codes (not one scale a row): ql read as int32 words, 8 low nibbles a word
                chunk = k0 // 32 + c3                          # [1, NG, 1]
                q4 = tl.arange(0, 4)[None, None, :]
                wd = tl.load(ql_ptr + r3 * s_ql + chunk * 4 + q4)   # [BN, NG, 4]
                if BITS == 5:   # the chunk's 5th bits: one word, bit e % 32 for column e (word q: bits 4q ..)
                    qw = tl.load(qh_ptr + r3 * s_qh + chunk)
                    hq_lo = qw >> (4 * q4)
                    hq_hi = qw >> (16 + 4 * q4)
                elif BITS == 6:   # two words (low / high half), bits 2 * (e % 16) .. + 1 for column e
                    hq_lo = tl.load(qh_ptr + r3 * s_qh + chunk * 2) >> (8 * q4)
                    hq_hi = tl.load(qh_ptr + r3 * s_qh + chunk * 2 + 1) >> (8 * q4)
                else:
                    hq_lo = wd
                    hq_hi = wd
                if GROUP >= 32:
                    a_lo, off_lo = _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin,
                                                s_mn, r3, (chunk * 32) // GROUP, GROUP, BLOCK, SUB_SCALE, OFFSET)
                    a_lo, off_lo = _fold(a_lo, off_lo, BITS, ZERO, False)
                    a_hi = a_lo
                    off_hi = off_lo
                else:           # 16-column groups: a chunk's low half is one group, its high half the next
                    a_lo, off_lo = _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin,
                                                s_mn, r3, chunk * 2, GROUP, BLOCK, SUB_SCALE, OFFSET)
                    a_lo, off_lo = _fold(a_lo, off_lo, BITS, ZERO, False)
                    a_hi, off_hi = _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin,
                                                s_mn, r3, chunk * 2 + 1, GROUP, BLOCK, SUB_SCALE, OFFSET)
                    a_hi, off_hi = _fold(a_hi, off_hi, BITS, ZERO, False)
                w_lo = _word_half(wd, hq_lo, a_lo, off_lo, 0, BITS, BLOCK_N, BLOCK_K).to(dt)
                w_hi = _word_half(wd, hq_hi, a_hi, off_hi, 1, BITS, BLOCK_N, BLOCK_K).to(dt)
                x_lo = tl.load(x_ptr + ms[None, :] * s_xm + k0 + kk[:, None], mask=m_ok[None, :], other=0.0)
                x_hi = tl.load(x_ptr + ms[None, :] * s_xm + k0 + 16 + kk[:, None], mask=m_ok[None, :], other=0.0)
                cur = _dot(w_lo, x_lo, cur, DOT_F32)
                cur = _dot(w_hi, x_hi, cur, DOT_F32)
            else:
                chunk = k0 // 32 + c3                          # [1, NG, 1]
                ql = tl.load(ql_ptr + r3 * s_ql + chunk * 16 + j3).to(tl.int32)   # [BN, NG, 16]
                lo = ql & 15
                hi = ql >> 4
                if BITS == 5:   # the chunk's 5th bits: one word, bit e % 32 for column e
                    hw = tl.load(qh_ptr + r3 * s_qh + chunk)
                    lo = lo | (((hw >> j3) & 1) << 4)
                    hi = hi | (((hw >> (j3 + 16)) & 1) << 4)
                elif BITS == 6:   # two words (low / high half), bits 2 * (e % 16) .. + 1 for column e
                    lo = lo | (((tl.load(qh_ptr + r3 * s_qh + chunk * 2) >> (2 * j3)) & 3) << 4)
                    hi = hi | (((tl.load(qh_ptr + r3 * s_qh + chunk * 2 + 1) >> (2 * j3)) & 3) << 4)
                if BITS == 4:   # each nibble shifted under the exponent and masked in one step (as the GEMV)
                    f_lo = (((ql << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
                    f_hi = (((ql << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
                else:
                    f_lo = _code_float(lo, BITS)
                    f_hi = _code_float(hi, BITS)
                if ROW:
                    v_lo = _row_values(f_lo, BITS, ZERO, False)
                    v_hi = _row_values(f_hi, BITS, ZERO, False)
                else:
                    if GROUP >= 32:
                        g = (chunk * 32) // GROUP
                        a, off = _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn,
                                              r3, g, GROUP, BLOCK, SUB_SCALE, OFFSET)
                        a, off = _fold(a, off, BITS, ZERO, False)
                        v_lo = tl.fma(a, f_lo, off)
                        v_hi = tl.fma(a, f_hi, off)
                    else:       # 16-column groups: a chunk's low half is one group, its high half the next
                        g = chunk * 2
                        a, off = _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn,
                                              r3, g, GROUP, BLOCK, SUB_SCALE, OFFSET)
                        a, off = _fold(a, off, BITS, ZERO, False)
                        v_lo = tl.fma(a, f_lo, off)
                        a, off = _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn,
                                              r3, g + 1, GROUP, BLOCK, SUB_SCALE, OFFSET)
                        a, off = _fold(a, off, BITS, ZERO, False)
                        v_hi = tl.fma(a, f_hi, off)
                w_lo = tl.reshape(v_lo, [BLOCK_N, BLOCK_K // 2]).to(dt)
                w_hi = tl.reshape(v_hi, [BLOCK_N, BLOCK_K // 2]).to(dt)
                x_lo = tl.load(x_ptr + ms[None, :] * s_xm + k0 + kk[:, None], mask=m_ok[None, :], other=0.0)
                x_hi = tl.load(x_ptr + ms[None, :] * s_xm + k0 + 16 + kk[:, None], mask=m_ok[None, :], other=0.0)
                cur = _dot(w_lo, x_lo, cur, DOT_F32)
                cur = _dot(w_hi, x_hi, cur, DOT_F32)
                if ROW and OFFSET != 0 and part == 0:
                    sx += tl.sum(x_lo.to(tl.float32), 0) + tl.sum(x_hi.to(tl.float32), 0)
            if part == 0:
                acc = cur
            else:
                acc_up = cur
    if ROW:   # the row's one scale (and offset times the sum of x)
        acc = _row_scale(acc, sx, rows, d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn,
                         GROUP, BLOCK, SUB_SCALE, OFFSET, BLOCK_N)
        if GATE_UP:
            acc_up = _row_scale(acc_up, sx, rows + N, d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin,
                                s_mn, GROUP, BLOCK, SUB_SCALE, OFFSET, BLOCK_N)
    n2 = rows_out[:, None]
    ok = (rows_out < N)[:, None] & m_ok[None, :]
    NP = N * (1 + GATE_UP)   # columns of a partial: the gate's, then the up's
    if SPLIT > 1:   # partials to the workspace; the tile's last program to finish sums them in order
        tl.store(part_ptr + (tl.program_id(2) * M + ms[None, :]) * NP + n2, acc, mask=ok)
        if GATE_UP:
            tl.store(part_ptr + (tl.program_id(2) * M + ms[None, :]) * NP + N + n2, acc_up, mask=ok)
        tl.debug_barrier()   # every thread's partial stored before the count is raised (release, gpu scope)
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        if tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
            acc = tl.load(part_ptr + ms[None, :] * NP + n2, mask=ok, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT):
                acc += tl.load(part_ptr + (s * M + ms[None, :]) * NP + n2, mask=ok, other=0.0, cache_modifier=".cg")
            if GATE_UP:
                acc_up = tl.load(part_ptr + ms[None, :] * NP + N + n2, mask=ok, other=0.0, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT):
                    acc_up += tl.load(part_ptr + (s * M + ms[None, :]) * NP + N + n2, mask=ok, other=0.0,
                                      cache_modifier=".cg")
                _epilogue_silu(acc, acc_up, out_ptr, b_ptr, rows, N, n2, ms, ok, s_om, HAS_BIAS)
            else:
                _epilogue(acc, out_ptr, b_ptr, res_ptr, rows, n2, ms, ok, s_om, s_rm, HAS_BIAS, RESIDUAL)
            tl.atomic_xchg(cnt_ptr + tile, 0)   # zero again for the next call
    elif GATE_UP:
        _epilogue_silu(acc, acc_up, out_ptr, b_ptr, rows, N, n2, ms, ok, s_om, HAS_BIAS)
    else:
        _epilogue(acc, out_ptr, b_ptr, res_ptr, rows, n2, ms, ok, s_om, s_rm, HAS_BIAS, RESIDUAL)


_COUNTERS: dict[torch.device, torch.Tensor] = {}   # per device: split-K tile counters, zero between calls


def counters(device: torch.device, tiles: int) -> torch.Tensor:
    """``tiles`` zeroed int32 counters for a split-K launch: a kept buffer (each launch leaves its counters at
    zero), made or grown outside a CUDA-graph capture; during one, a fresh zeroed tensor (its memset captured).
    Launches sharing the kept buffer must not run at once (one stream per device, as the engine runs)."""
    have = _COUNTERS.get(device)
    if have is not None and have.numel() >= tiles:
        return have
    fresh = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        _COUNTERS[device] = fresh
    return fresh


def _words(w: PackedWeight, k: int) -> torch.Tensor | None:
    """The codes plane as int32 words where the kernel reads it so (ql of 4-6-bit codes, not one scale a row;
    int8 codes), if its start and row stride lie on 4-byte boundaries; else None (bytes)."""
    f = w.fmt
    if f.bits < 8 and not row_mode(f, k):
        t = w.ql
    elif f.bits == 8 and not f.float_codes:
        t = w.q
    else:
        return None
    if t is None or t.stride(0) % 4 or t.storage_offset() % 4 or t.data_ptr() % 4:
        return None
    return t.view(torch.int32)


def _split(k: int, block_k: int, want: int) -> int:
    """The largest power of two <= ``want`` that divides K's loop steps."""
    steps = k // block_k
    s = 1
    while s * 2 <= want and steps % (s * 2) == 0:
        s *= 2
    return s


def _check(x: torch.Tensor, w: PackedWeight, name: str) -> None:
    k = w.shape[1]
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{name} takes x [M, {k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{name} multiplies bfloat16, float16 or float32 activations, not {x.dtype}")
    if x.device != w.device:
        raise ValueError(f"{name}: x on {x.device}, weight on {w.device}")


def qmm(x: torch.Tensor, w: PackedWeight, b: torch.Tensor | None = None, *, residual: torch.Tensor | None = None,
        config: MMConfig | None = None) -> torch.Tensor:
    """``x`` [M, K] (bfloat16, float16 or float32), ``w`` packed [N, K] -> ``residual + x @ dequant(w).T + b``
    [M, N] in x's dtype (``b`` [N], ``residual`` [M, N]; each optional), rounded where
    ``residual + F.linear(x, dequantize_to(w, x.dtype), b)`` rounds. ``config``: a launch shape other than
    :func:`mm_config`'s (its split_k lowered to what divides K's steps)."""
    _check(x, w, "qmm")
    n, m = w.shape[0], x.shape[0]
    if residual is not None and residual.shape != (m, n):
        raise ValueError(f"qmm's residual is [{m}, {n}], got {tuple(residual.shape)}")
    if b is not None and b.shape != (n,):
        raise ValueError(f"qmm's bias is [{n}], got {tuple(b.shape)}")
    return _launch(x, w, b, residual, n, False, config)


def qmm_gate_up_silu(x: torch.Tensor, w: PackedWeight, b: torch.Tensor | None = None, *,
                     config: MMConfig | None = None) -> torch.Tensor:
    """``x`` [M, K], ``w`` packed [2N, K] (gate rows, then up rows), ``b`` [2N] or None -> silu(gate) * up
    [M, N] in x's dtype, gate and up rounded to it first (as
    :func:`chatcore.layers.triton_qgemv.qgemv_gate_up_silu`): one kernel, each program reducing a tile of gate
    rows and the up rows N further."""
    _check(x, w, "qmm_gate_up_silu")
    n2 = w.shape[0]
    if n2 % 2:
        raise ValueError(f"qmm_gate_up_silu takes a [2N, K] weight, got {n2} rows")
    if b is not None and b.shape != (n2,):
        raise ValueError(f"qmm_gate_up_silu's bias is [{n2}], got {tuple(b.shape)}")
    return _launch(x, w, b, None, n2 // 2, True, config)


def _launch(x: torch.Tensor, w: PackedWeight, b: torch.Tensor | None, residual: torch.Tensor | None, n: int,
            gate_up: bool, config: MMConfig | None) -> torch.Tensor:
    k = w.shape[1]
    m = x.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    cfg = config or mm_config(m, n, k, w.fmt, gate_up)
    block_k = tile_k(w.fmt, k, cfg.block_k)
    if w.fmt.bits == 8:
        gs = block_k if row_mode(w.fmt, k) else w.fmt.group
        ng = block_k // gs
    else:
        gs, ng = 32, block_k // 32
    split = _split(k, block_k, cfg.split_k)
    planes, strides = plane_args(w)
    words = _words(w, k)
    if words is not None:   # the codes as int32 words
        at = 2 if w.fmt.bits == 8 else 0
        planes[at], strides[at] = words, words.stride(0)
    x = x if x.stride(1) == 1 else x.contiguous()
    res = residual if residual is None or residual.stride(1) == 1 else residual.contiguous()
    bias = b.contiguous() if b is not None else x
    cols = 2 * n if gate_up else n
    part = torch.empty((split, m, cols), dtype=torch.float32, device=x.device) if split > 1 else out
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    cnt = counters(x.device, grid[0] * grid[1]) if split > 1 else out
    dot_f32 = x.dtype == torch.float32 or x.device.type == "cpu"
    _qmm[grid](x, out, bias, res if res is not None else x, part, cnt, m, n, k, k // split, x.stride(0),
               out.stride(0), res.stride(0) if res is not None else 0, *planes, *strides,
               **format_constants(w.fmt, k), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, NG=ng,
               GS=gs, SPLIT=split, WORDS=words is not None, HAS_BIAS=b is not None, RESIDUAL=res is not None,
               GATE_UP=int(gate_up), DOT_F32=dot_f32, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
