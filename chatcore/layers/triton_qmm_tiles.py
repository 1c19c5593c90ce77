"""The pieces of :mod:`chatcore.layers.triton_qmm`'s kernel (Triton jit functions): codes read from int32
words to float32 values under a float exponent, the one-FMA dequantization's constants, the dot (float32 on
the CPU interpreter), and the epilogues (row scale, bias / residual, silu(gate) * up). See that module's
docstring for the arithmetic."""

from __future__ import annotations

import triton
import triton.language as tl

from chatcore.layers.triton_qgemv import _group_scale


@triton.jit
def _fold(a, off, BITS: tl.constexpr, ZERO: tl.constexpr, FLOAT_CODES: tl.constexpr):
    """The group constants (A', o') of the one-FMA dequantization ``A' * f + o'`` (see the module docstring)."""
    if FLOAT_CODES:
        return a, off
    else:
        return a * (1 << BITS), off - ((1 << BITS) + ZERO) * a


@triton.jit
def _row_values(f, BITS: tl.constexpr, ZERO: tl.constexpr, FLOAT_CODES: tl.constexpr):
    """One scale per row: the exact ``code - zero`` from ``f`` (float codes as they are)."""
    if FLOAT_CODES:
        return f
    else:
        return tl.fma(f, 1 << BITS, -((1 << BITS) + ZERO))


@triton.jit
def _shift(t, S: tl.constexpr):
    """``t << S`` (S >= 0) or ``t >> -S`` (arithmetic: the sign fills bits the callers' masks drop)."""
    if S >= 0:
        return t << S
    else:
        return t >> (-S)


@triton.jit
def _word_code(wd, hq, B: tl.constexpr, HALF: tl.constexpr, BITS: tl.constexpr):
    """The code of byte B's low (HALF 0) or high (1) nibble of the ql words ``wd``, with its high bits from
    ``hq`` (5 bits: bit B; 6 bits: bits 2B .. 2B + 1) when BITS > 4, as the float32 1 + code / 2**BITS (the
    code's bits under the exponent, at 23 - BITS .. 22)."""
    t = (_shift(wd, 23 - BITS - 8 * B - 4 * HALF) & (15 << (23 - BITS))) | 0x3F800000
    if BITS == 5:
        t = t | (_shift(hq, 22 - B) & 0x400000)
    elif BITS == 6:
        t = t | (_shift(hq, 21 - 2 * B) & 0x600000)
    return t.to(tl.float32, bitcast=True)


@triton.jit
def _word_half(wd, hq, a, off, HALF: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """The low (HALF 0) or high (1) nibbles of the words ``wd`` [BN, NG, 4] (word q of a chunk holds bytes
    4q .. 4q + 3, byte b its columns 4q + b and 16 + 4q + b; ``hq``: the high bits of those columns, shifted to
    word q's) dequantized as ``a * f + off``: [BN, BLOCK_K / 2] in column order chunk * 32 + 4q + b
    (+ 16 for the high nibbles)."""
    v0 = tl.fma(a, _word_code(wd, hq, 0, HALF, BITS), off)
    v1 = tl.fma(a, _word_code(wd, hq, 1, HALF, BITS), off)
    v2 = tl.fma(a, _word_code(wd, hq, 2, HALF, BITS), off)
    v3 = tl.fma(a, _word_code(wd, hq, 3, HALF, BITS), off)
    v = tl.join(tl.join(v0, v2), tl.join(v1, v3))      # [BN, NG, 4, 2, 2]: [.., i, j] is byte 2i + j
    return tl.reshape(v, [BLOCK_N, BLOCK_K // 2])


@triton.jit
def _byte(wd, SHIFT: tl.constexpr):
    """The byte of the int32 words ``wd`` at bits 15 - SHIFT .. 22 - SHIFT, an int8 code c, as the float32
    1 + (c + 128) / 256: its bits under the exponent with the top bit flipped (one mask-and-xor)."""
    if SHIFT >= 0:
        t = wd << SHIFT
    else:
        t = wd >> (-SHIFT)
    return ((t & 0x7F8000) ^ 0x3FC00000).to(tl.float32, bitcast=True)


@triton.jit
def _word_bytes(wd, a, off, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 codes of the words ``wd`` [BN, NG, W] (byte b of word q: column 4q + b of the tile) dequantized
    as ``a * f + off``: [BN, BLOCK_K] in column order."""
    v0 = tl.fma(a, _byte(wd, 15), off)
    v1 = tl.fma(a, _byte(wd, 7), off)
    v2 = tl.fma(a, _byte(wd, -1), off)
    v3 = tl.fma(a, _byte(wd, -9), off)
    v = tl.join(tl.join(v0, v2), tl.join(v1, v3))      # [.., i, j] is byte 2i + j
    return tl.reshape(v, [BLOCK_N, BLOCK_K])


@triton.jit
def _dot(w, xt, acc, DOT_F32: tl.constexpr):
    """acc + w @ xt, w already rounded to x's dtype; DOT_F32: both in float32 at full precision."""
    if DOT_F32:
        return tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(w, xt, acc)


@triton.jit
def _row_scale(acc, sx, rows, d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn,
               GROUP: tl.constexpr, BLOCK: tl.constexpr, SUB_SCALE: tl.constexpr, OFFSET: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """One scale a row: acc * A[row] (+ offset[row] * sum(x))."""
    g0 = tl.zeros([BLOCK_N, 1], dtype=tl.int32)
    a, off = _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn, rows[:, None],
                          g0, GROUP, BLOCK, SUB_SCALE, OFFSET)
    acc = acc * a
    if OFFSET != 0:
        acc += off * sx[None, :]
    return acc


@triton.jit
def _epilogue_silu(acc, acc_up, out_ptr, b_ptr, rows, N, n2, ms, ok, s_om, HAS_BIAS: tl.constexpr):
    """out.T tile = silu(gate) * up, gate and up (+ their biases) rounded first, as qgemv_gate_up_silu."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows).to(tl.float32)[:, None]
        acc_up += tl.load(b_ptr + rows + N).to(tl.float32)[:, None]
    g = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    u = acc_up.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + ms[None, :] * s_om + n2, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _epilogue(acc, out_ptr, b_ptr, res_ptr, rows, n2, ms, ok, s_om, s_rm, HAS_BIAS: tl.constexpr,
              RESIDUAL: tl.constexpr):
    """out.T tile = acc (+ bias in float32), rounded, (+ residual, rounded again)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows).to(tl.float32)[:, None]
    if RESIDUAL:
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32) + tl.load(
            res_ptr + ms[None, :] * s_rm + n2, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + ms[None, :] * s_om + n2, acc.to(out_ptr.dtype.element_ty), mask=ok)
