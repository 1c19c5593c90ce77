"""A packed weight dequantized on the GPU (Triton): the prefill path's [N, K] matrix for cuBLAS.

:func:`dequantize_to` computes every element as :func:`chatcore.quant.packed.dequantize` does (float32, the
same operations in the same order: ``A = d * sc``, ``A * (code - zero)``, then ``+ m`` or ``- dmin * mn``) and
rounds once to the requested dtype. The kernel is compiled with floating-point contraction off
(``enable_fp_fusion=False``), so no multiply-add is fused into an FMA and each operation rounds as the reference's
does: the float32 result equals the reference bit for bit. bfloat16 is rounded (to nearest even, as
``Tensor.to`` rounds) by integer operations, which Triton's CPU interpreter runs as the GPU does (its own
float32 -> bfloat16 cast truncates). Each program writes a [BLOCK_N, BLOCK_K] tile in
column order (a 32-column chunk as its low-nibble half, then its high-nibble half); the work is bound by
writing the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from chatcore.layers.triton_qgemv import format_constants, plane_args, tile_k
from chatcore.quant.packed import PackedWeight


@triton.jit
def _scale_at(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn, r, col, c,
              GROUP: tl.constexpr, BLOCK: tl.constexpr, SUB_SCALE: tl.constexpr, OFFSET: tl.constexpr):
    """The value of code ``c`` (float32) at column ``col`` of rows ``r``, as the reference computes it."""
    g = col // GROUP
    blk = col // BLOCK
    a = tl.load(d_ptr + r * s_d + blk).to(tl.float32)
    if SUB_SCALE:
        a = a * tl.load(sc_ptr + r * s_sc + g).to(tl.float32)
    v = a * c
    if OFFSET == 1:
        v = v + tl.load(m_ptr + r * s_m + g).to(tl.float32)
    elif OFFSET == 2:
        v = v - tl.load(dmin_ptr + r * s_dmin + blk).to(tl.float32) * tl.load(mn_ptr + r * s_mn + g).to(tl.float32)
    return v


@triton.jit
def _dequant(out_ptr, N, K, ql_ptr, qh_ptr, q_ptr, d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr,
             s_ql, s_qh, s_q, s_d, s_sc, s_m, s_dmin, s_mn,
             BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr, ZERO: tl.constexpr,
             SUB_SCALE: tl.constexpr, OFFSET: tl.constexpr, FLOAT_CODES: tl.constexpr, ROW: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BF16_BITS: tl.constexpr):
    rows_out = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(rows_out, N - 1).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    if BITS == 8:
        r = rows[:, None]
        col = k0 + tl.arange(0, BLOCK_K)[None, :]
        q = tl.load(q_ptr + r * s_q + col)
        if FLOAT_CODES:
            c = q.to(tl.float32)
        else:
            c = (q.to(tl.int32) - ZERO).to(tl.float32)
        mask = (rows_out < N)[:, None]
    else:   # [BLOCK_N, chunks, half, 16]: column 32 * chunk + 16 * half + j
        r = rows[:, None, None, None]
        chunk = k0 // 32 + tl.arange(0, BLOCK_K // 32)[None, :, None, None]
        half = tl.arange(0, 2)[None, None, :, None]
        j = tl.arange(0, 16)[None, None, None, :]
        col = chunk * 32 + half * 16 + j
        code = (tl.load(ql_ptr + r * s_ql + chunk * 16 + j).to(tl.int32) >> (4 * half)) & 15
        if BITS == 5:
            code = code | (((tl.load(qh_ptr + r * s_qh + chunk) >> (16 * half + j)) & 1) << 4)
        elif BITS == 6:
            code = code | (((tl.load(qh_ptr + r * s_qh + chunk * 2 + half) >> (2 * j)) & 3) << 4)
        c = (code - ZERO).to(tl.float32)
        mask = (rows_out < N)[:, None, None, None]
    v = _scale_at(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn, r, col, c, GROUP, BLOCK,
                  SUB_SCALE, OFFSET)
    if BF16_BITS:   # rounded to nearest even by hand, stored as the bfloat16's bits (out_ptr: int16)
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + r * K + col, bits.to(tl.int16), mask=mask)
    else:
        tl.store(out_ptr + r * K + col, v.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_to(w: PackedWeight, dtype: torch.dtype = torch.bfloat16, *, block_n: int = 8,
                  block_k: int = 512) -> torch.Tensor:
    """The [N, K] values of ``w`` in ``dtype`` (float32, bfloat16 or float16), on w's device: bit for bit
    :func:`chatcore.quant.packed.dequantize` (float32, then rounded to ``dtype``). ``block_n`` / ``block_k``:
    the tile each program writes (powers of two)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dequantize_to writes float32, bfloat16 or float16, not {dtype}")
    n, k = w.shape
    bk = tile_k(w.fmt, k, block_k)
    planes, strides = plane_args(w)
    if not w.fmt.float_codes and w.fmt.bits == 8:
        planes[2] = w.q   # type: ignore[assignment]  # int8 codes as int8 here (the GEMV reads their bits)
    out = torch.empty((n, k), dtype=dtype, device=w.device)
    consts = format_constants(w.fmt, k) | {"ZERO": w.fmt.zero}   # the codes' own zero: int8 read as int8 here
    bf16 = dtype == torch.bfloat16
    _dequant[(triton.cdiv(n, block_n), k // bk)](out.view(torch.int16) if bf16 else out, n, k, *planes, *strides,
                                                 **consts, BLOCK_N=block_n, BLOCK_K=bk, BF16_BITS=bf16,
                                                 num_warps=4, enable_fp_fusion=False)
    return out
