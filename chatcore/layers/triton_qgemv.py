"""Matrix-vector product with a packed weight for one decode token (Triton): ``x [1, K] @ dequant(w).T (+ b)``.

The packed counterpart of :mod:`chatcore.layers.triton_gemv`, with the same prologue (the RMSNorm folded in:
its weight multiplies x, its 1/rms the row sums) and the same epilogues (bias; residual add rounded as the
unfused product is; for :func:`qgemv_gate_up_silu`, ``silu(gate) * up`` from the fused gate/up weight). One
kernel covers every :class:`~chatcore.quant.packed.QuantFormat` the planar layout allows, the format entering
as constexprs, so each format compiles to its own specialised code.

Per tile of BLOCK_N rows x BLOCK_K columns the kernel reads each plane once (no masks: rows past N are clamped
for loads, and BLOCK_K divides K), and per group of columns sharing a scale it sums ``code * x`` in float32,
then multiplies by the group's scale ``A`` and adds ``offset * sum(x)``: the per-weight work is a few integer
operations and one fused multiply-add. A code ``c`` (0 <= c < 2**bits; int8 codes shifted by 128) becomes the
float ``f = 1 + c / 2**bits`` by writing its bits under a float32 exponent (no int-to-float conversion), so a
group's ``sum((c - zero) * x)`` is ``2**bits * sum(f * x) - (2**bits + zero) * sum(x)``. For 4-6 bits one ``ql``
byte gives the codes of columns j and j + 16 of its 32-column chunk (the layout's order), multiplied by x[j]
and x[j + 16]; the high bits come from 32-bit words of ``qh`` (a chunk's 5th bits are one word, its 5th-6th bits
two). float8 codes convert directly.

Launch shapes come from :func:`launch_config` (a small table by format and shape); ``config=`` overrides it
(the benchmark's sweep). Nothing here reads the device from the host, so a call can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from chatcore.quant.packed import PackedWeight, QuantFormat

OFFSETS = {None: 0, "min": 1, "dmin": 2}


@dataclass(frozen=True)
class QConfig:
    """A launch shape: rows per program, columns per loop step (a power of two dividing K, a multiple of the
    format's group and of 32), warps, pipeline stages."""

    block_n: int = 4
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v <= 0 or v & (v - 1):
                raise ValueError(f"QConfig.{name} must be a power of two, got {v}")
        if self.num_warps <= 0 or self.num_stages <= 0:
            raise ValueError("QConfig: warps and stages must be positive")


def row_mode(fmt: QuantFormat, k: int) -> bool:
    """Whether one scale group spans a whole row (int8 / fp8 per channel): scaled once after the row's sum."""
    return fmt.group == k


def tile_k(fmt: QuantFormat, k: int, target: int) -> int:
    """The loop step for K columns: the largest power of two <= ``target`` (raised to the group) that divides K
    and is a multiple of 32 and, outside row mode, of the group."""
    unit = 32 if row_mode(fmt, k) else max(32, fmt.group)
    if unit & (unit - 1) or k % unit:
        raise ValueError(f"{fmt.name}: group {fmt.group} over {k} columns has no packed kernel "
                         "(groups are powers of two, or one per row)")
    bk = unit
    while bk * 2 <= max(target, unit) and k % (bk * 2) == 0:
        bk *= 2
    return bk


def launch_config(n: int, k: int, fmt: QuantFormat, gate_up: bool = False) -> QConfig:
    """The default launch shape for an [n, k] weight of ``fmt`` (``gate_up``: for :func:`qgemv_gate_up_silu`,
    n gate rows, each program reading as many up rows again). One warp over several rows, so each thread holds
    the same columns of those rows and loads, normalises and sums x once for them: ptxas for sm_90 counts ~6 SASS
    instructions per weight in the loop, against ~9 with 4 warps over 4 rows, whose x moves through shared memory
    every step. Rows: 8 (4 for 5-bit codes, whose high bits take more registers), halved for gate/up, where
    ptxas spills no register. Adjusted by the first H200 sweep of bench/quant_kernels.py (q4_k and q8_0 at the
    8B shapes, bench/README.md): 4-6-bit codes 4 rows a program (2 for gate/up), four warps for the narrower
    outputs (o, down, gate/up) and one for the wide ones (qkv, head); 8-bit codes 4 rows x 512 columns with four
    warps for square shapes and gate/up, else 8 rows x 1024 with two."""
    if fmt.bits == 8:
        if gate_up or (n <= 4096 and k <= 4096):
            return QConfig(block_n=4, block_k=512, num_warps=4, num_stages=3)
        return QConfig(block_n=8, block_k=1024, num_warps=2, num_stages=3)
    rows = 2 if gate_up else 4
    return QConfig(block_n=rows, block_k=1024, num_warps=4 if gate_up or n <= 4096 else 1, num_stages=3)


def plane_args(w: PackedWeight) -> tuple[list[torch.Tensor], list[int]]:
    """The kernels' plane pointers and row strides (elements), in the order ql, qh, q, d, sc, m, dmin, mn:
    qh as int32 words, integer codes as uint8 (their bits), float8 codes as they are; an unused plane is d with
    stride 0."""
    planes = w.planes()
    for name, t in planes.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{w.fmt.name}: plane {name} must be contiguous along K")
    d = planes["d"]
    out: list[torch.Tensor] = []
    strides: list[int] = []
    for name in ("ql", "qh", "q", "d", "sc", "m", "dmin", "mn"):
        t = planes.get(name)
        if t is None:
            out.append(d)
            strides.append(0)
            continue
        if name == "qh":
            t = t.view(torch.int32)
        elif name == "q" and not w.fmt.float_codes:
            t = t.view(torch.uint8)
        out.append(t)
        strides.append(t.stride(0))
    return out, strides


def format_constants(fmt: QuantFormat, k: int) -> dict[str, object]:
    """The kernels' format constexprs (ZERO: the zero of the unsigned code the kernels see, int8 codes + 128)."""
    zero = fmt.zero + (128 if fmt.bits == 8 and not fmt.float_codes else 0)
    return {"BITS": fmt.bits, "GROUP": fmt.group, "BLOCK": fmt.block, "ZERO": zero, "SUB_SCALE": fmt.sub_scale,
            "OFFSET": OFFSETS[fmt.offset], "FLOAT_CODES": fmt.float_codes, "ROW": row_mode(fmt, k)}


def group_shape(fmt: QuantFormat, block_k: int) -> dict[str, int]:
    """A tile's groups: NG groups of CPG 32-column chunks (4-6 bits; 16-column groups: NG chunks, two groups
    each), or NG groups (8 bits)."""
    if fmt.bits == 8 or fmt.group >= 32:
        return {"NG": max(block_k // fmt.group, 1), "CPG": max(fmt.group // 32, 1)}
    return {"NG": block_k // 32, "CPG": 1}


@triton.jit
def _code_float(c, BITS: tl.constexpr):
    """The integer code ``c`` (int32, 0 <= c < 2**BITS) as the float32 1 + c / 2**BITS, exactly."""
    return ((c << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _quarters(t):
    """``t`` [.., 16] as four [.., 4] tensors (elements j = 4a + 2b + c for c, b fixed), for an FMA chain."""
    r = tl.reshape(t, [t.shape[0], t.shape[1], t.shape[2], 4, 2, 2])
    t0, t1 = tl.split(r)
    t00, t01 = tl.split(t0)
    t10, t11 = tl.split(t1)
    return t00, t01, t10, t11


@triton.jit
def _dot16(f, x):
    """sum(f * x) over the last two axes of [BN, NG, CPG, 16] (x broadcast over rows): [BN, NG], the products
    chained as multiply-adds four deep before the tree sums."""
    f0, f1, f2, f3 = _quarters(f)
    x0, x1, x2, x3 = _quarters(x)
    return tl.sum(tl.sum(f0 * x0 + f1 * x1 + f2 * x2 + f3 * x3, 3), 2)


@triton.jit
def _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn, r, g,
                 GROUP: tl.constexpr, BLOCK: tl.constexpr, SUB_SCALE: tl.constexpr, OFFSET: tl.constexpr):
    """Scale A and offset of groups ``g`` (int, broadcast against rows ``r``): v = A * (code - zero) + offset."""
    blk = (g * GROUP) // BLOCK
    a = tl.load(d_ptr + r * s_d + blk).to(tl.float32)
    if SUB_SCALE:
        a = a * tl.load(sc_ptr + r * s_sc + g).to(tl.float32)
    if OFFSET == 1:
        off = tl.load(m_ptr + r * s_m + g).to(tl.float32)
    elif OFFSET == 2:
        off = -(tl.load(dmin_ptr + r * s_dmin + blk).to(tl.float32) * tl.load(mn_ptr + r * s_mn + g).to(tl.float32))
    else:
        off = tl.zeros_like(a)
    return a, off


@triton.jit
def _scaled(dot, sx, a, off, BITS: tl.constexpr, ZERO: tl.constexpr, FLOAT_CODES: tl.constexpr):
    """A group's contribution from sum(f * x) and sum(x) (see the module docstring)."""
    if FLOAT_CODES:
        return a * dot + off * sx
    else:
        return a * ((1 << BITS) * dot - ((1 << BITS) + ZERO) * sx) + off * sx


@triton.jit
def _low_bits_tile(ql_ptr, qh_ptr, d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_ql, s_qh, s_d, s_sc, s_m, s_dmin,
                   s_mn, rows, k0, x_lo, x_hi, sx_lo, sx_hi, BITS: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK: tl.constexpr, ZERO: tl.constexpr, SUB_SCALE: tl.constexpr, OFFSET: tl.constexpr,
                   NG: tl.constexpr, CPG: tl.constexpr):
    """4-6-bit codes: the tile's contribution [BLOCK_N, NG] from rows ``rows`` (int64) and columns k0..+BLOCK_K,
    x given per chunk as its low / high halves [1, NG, CPG, 16] (CPG chunks of 32 columns per group)."""
    r4 = rows[:, None, None, None]
    chunk = (k0 // 32 + tl.arange(0, NG)[None, :, None, None] * CPG
             + tl.arange(0, CPG)[None, None, :, None])                       # [1, NG, CPG, 1]: global chunk
    j = tl.arange(0, 16)[None, None, None, :]
    ql = tl.load(ql_ptr + r4 * s_ql + chunk * 16 + j).to(tl.int32)          # [BN, NG, CPG, 16]
    if BITS == 4:   # each nibble shifted under the exponent and masked in one step
        f_lo = (((ql << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
        f_hi = (((ql << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
    lo = ql & 15
    hi = ql >> 4
    if BITS == 5:   # the chunk's 5th bits: one word, bit e % 32 for column e
        w = tl.load(qh_ptr + r4 * s_qh + chunk)
        lo = lo | (((w >> j) & 1) << 4)
        hi = hi | (((w >> (j + 16)) & 1) << 4)
    elif BITS == 6:   # two words (low / high half), bits 2 * (e % 16) .. + 1 for column e
        w_lo = tl.load(qh_ptr + r4 * s_qh + chunk * 2)
        w_hi = tl.load(qh_ptr + r4 * s_qh + chunk * 2 + 1)
        lo = lo | (((w_lo >> (2 * j)) & 3) << 4)
        hi = hi | (((w_hi >> (2 * j)) & 3) << 4)
    if BITS != 4:
        f_lo = _code_float(lo, BITS)
        f_hi = _code_float(hi, BITS)
    dot_lo = _dot16(f_lo, x_lo)                                               # [BN, NG]
    dot_hi = _dot16(f_hi, x_hi)
    r2 = rows[:, None]
    if GROUP >= 32:
        g = k0 // GROUP + tl.arange(0, NG)[None, :]
        a, off = _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn, r2, g,
                              GROUP, BLOCK, SUB_SCALE, OFFSET)
        part = _scaled(dot_lo + dot_hi, sx_lo + sx_hi, a, off, BITS, ZERO, False)
    else:   # 16-column groups: a chunk's low half is one group, its high half the next
        g = k0 // GROUP + 2 * tl.arange(0, NG)[None, :]
        a, off = _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn, r2, g,
                              GROUP, BLOCK, SUB_SCALE, OFFSET)
        part = _scaled(dot_lo, sx_lo, a, off, BITS, ZERO, False)
        a, off = _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn, r2, g + 1,
                              GROUP, BLOCK, SUB_SCALE, OFFSET)
        part += _scaled(dot_hi, sx_hi, a, off, BITS, ZERO, False)
    return part


@triton.jit
def _byte_codes(q_ptr, offs, FLOAT_CODES: tl.constexpr):
    """8-bit codes at ``offs`` as floats: float8 values, or int8 codes c as 1 + (c + 128) / 256."""
    q = tl.load(q_ptr + offs)
    if FLOAT_CODES:
        return q.to(tl.float32)
    else:
        return _code_float(q.to(tl.int32) ^ 0x80, 8)


@triton.jit
def _byte_tile(q_ptr, d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_q, s_d, s_sc, s_m, s_dmin, s_mn, rows, k0, x, sx,
               GROUP: tl.constexpr, BLOCK: tl.constexpr, ZERO: tl.constexpr, SUB_SCALE: tl.constexpr,
               OFFSET: tl.constexpr, FLOAT_CODES: tl.constexpr, NG: tl.constexpr):
    """8-bit codes, groups within the tile: contribution [BLOCK_N, NG]; x [1, NG, GROUP], sx [1, NG]."""
    offs = rows[:, None, None] * s_q + k0 + tl.arange(0, NG)[None, :, None] * GROUP + tl.arange(0, GROUP)[None, None, :]
    dot = tl.sum(_byte_codes(q_ptr, offs, FLOAT_CODES) * x, 2)
    g = k0 // GROUP + tl.arange(0, NG)[None, :]
    a, off = _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn, rows[:, None], g,
                          GROUP, BLOCK, SUB_SCALE, OFFSET)
    return _scaled(dot, sx, a, off, 8, ZERO, FLOAT_CODES)


@triton.jit
def _row_products(ql_ptr, qh_ptr, q_ptr, s_ql, s_qh, s_q, rows, k0, x, BITS: tl.constexpr,
                  FLOAT_CODES: tl.constexpr, BLOCK_K: tl.constexpr):
    """One scale per row: the tile's f * x products [BLOCK_N, BLOCK_K] (x [1, BLOCK_K], natural column order),
    summed over the row and scaled after the loop."""
    cols = k0 + tl.arange(0, BLOCK_K)[None, :]
    r = rows[:, None]
    if BITS == 8:
        f = _byte_codes(q_ptr, r * s_q + cols, FLOAT_CODES)
    else:
        e = cols % 32
        half = e // 16
        j = e % 16
        c = (tl.load(ql_ptr + r * s_ql + (cols // 32) * 16 + j).to(tl.int32) >> (4 * half)) & 15
        if BITS == 5:
            c = c | (((tl.load(qh_ptr + r * s_qh + cols // 32) >> e) & 1) << 4)
        elif BITS == 6:
            c = c | (((tl.load(qh_ptr + r * s_qh + (cols // 32) * 2 + half) >> (2 * j)) & 3) << 4)
        f = _code_float(c, BITS)
    return f * x


@triton.jit
def _load_x(x_ptr, nw_ptr, offs, NORM: tl.constexpr):
    """x at ``offs`` (float32) times the norm weight when NORM, and its squares (before the weight)."""
    x = tl.load(x_ptr + offs).to(tl.float32)
    sq = x * x
    if NORM:
        x = x * tl.load(nw_ptr + offs).to(tl.float32)
    return x, sq


@triton.jit
def _qgemv(x_ptr, out_ptr, b_ptr, nw_ptr, res_ptr, eps, N, K,
           ql_ptr, qh_ptr, q_ptr, d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr,
           s_ql, s_qh, s_q, s_d, s_sc, s_m, s_dmin, s_mn,
           BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr, ZERO: tl.constexpr,
           SUB_SCALE: tl.constexpr, OFFSET: tl.constexpr, FLOAT_CODES: tl.constexpr, ROW: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NG: tl.constexpr, CPG: tl.constexpr,
           HAS_BIAS: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, GATE_UP: tl.constexpr):
    """out[rows] for BLOCK_N rows; GATE_UP: rows are gate rows, their up rows N further, out = silu(g) * u."""
    rows_out = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows_out < N
    rows = tl.minimum(rows_out, N - 1).to(tl.int64)   # rows past N read row N - 1; their results are not stored
    rows_up = rows + N
    if ROW:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        squares = tl.zeros([1, BLOCK_K], dtype=tl.float32)
        xsum = tl.zeros([1, BLOCK_K], dtype=tl.float32)
    elif BITS == 8:
        acc = tl.zeros([BLOCK_N, NG], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, NG], dtype=tl.float32)
        squares = tl.zeros([1, NG, GROUP], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, NG], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, NG], dtype=tl.float32)
        squares = tl.zeros([1, NG, CPG, 16], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        if ROW:
            x, sq = _load_x(x_ptr, nw_ptr, k0 + tl.arange(0, BLOCK_K)[None, :], NORM)
            squares += sq
            xsum += x
            acc += _row_products(ql_ptr, qh_ptr, q_ptr, s_ql, s_qh, s_q, rows, k0, x, BITS, FLOAT_CODES, BLOCK_K)
            if GATE_UP:
                acc_up += _row_products(ql_ptr, qh_ptr, q_ptr, s_ql, s_qh, s_q, rows_up, k0, x, BITS, FLOAT_CODES,
                                        BLOCK_K)
        elif BITS == 8:
            offs = (k0 + tl.arange(0, NG)[None, :, None] * GROUP
                    + tl.arange(0, GROUP)[None, None, :])
            x, sq = _load_x(x_ptr, nw_ptr, offs, NORM)
            squares += sq
            sx = tl.sum(x, 2)
            acc += _byte_tile(q_ptr, d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_q, s_d, s_sc, s_m, s_dmin, s_mn,
                              rows, k0, x, sx, GROUP, BLOCK, ZERO, SUB_SCALE, OFFSET, FLOAT_CODES, NG)
            if GATE_UP:
                acc_up += _byte_tile(q_ptr, d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_q, s_d, s_sc, s_m, s_dmin,
                                     s_mn, rows_up, k0, x, sx, GROUP, BLOCK, ZERO, SUB_SCALE, OFFSET, FLOAT_CODES,
                                     NG)
        else:
            offs = (k0 + (tl.arange(0, NG)[None, :, None, None] * CPG + tl.arange(0, CPG)[None, None, :, None]) * 32
                    + tl.arange(0, 16)[None, None, None, :])
            x_lo, sq_lo = _load_x(x_ptr, nw_ptr, offs, NORM)
            x_hi, sq_hi = _load_x(x_ptr, nw_ptr, offs + 16, NORM)
            squares += sq_lo + sq_hi
            sx_lo = tl.sum(tl.sum(x_lo, 3), 2)
            sx_hi = tl.sum(tl.sum(x_hi, 3), 2)
            acc += _low_bits_tile(ql_ptr, qh_ptr, d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_ql, s_qh, s_d, s_sc,
                                  s_m, s_dmin, s_mn, rows, k0, x_lo, x_hi, sx_lo, sx_hi, BITS, GROUP, BLOCK, ZERO,
                                  SUB_SCALE, OFFSET, NG, CPG)
            if GATE_UP:
                acc_up += _low_bits_tile(ql_ptr, qh_ptr, d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_ql, s_qh, s_d,
                                         s_sc, s_m, s_dmin, s_mn, rows_up, k0, x_lo, x_hi, sx_lo, sx_hi, BITS, GROUP,
                                         BLOCK, ZERO, SUB_SCALE, OFFSET, NG, CPG)
    if ROW:   # the row's one scale and offset, after its sums
        sx_row = tl.sum(tl.sum(xsum, 1), 0)
        g0 = tl.zeros([BLOCK_N, 1], dtype=tl.int32)
        a, off = _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn, rows[:, None],
                              g0, GROUP, BLOCK, SUB_SCALE, OFFSET)
        out = tl.sum(_scaled(tl.sum(acc, 1)[:, None], sx_row, a, off, BITS, ZERO, FLOAT_CODES), 1)
        if GATE_UP:
            a, off = _group_scale(d_ptr, sc_ptr, m_ptr, dmin_ptr, mn_ptr, s_d, s_sc, s_m, s_dmin, s_mn,
                                  rows_up[:, None], g0, GROUP, BLOCK, SUB_SCALE, OFFSET)
            out_up = tl.sum(_scaled(tl.sum(acc_up, 1)[:, None], sx_row, a, off, BITS, ZERO, FLOAT_CODES), 1)
    else:
        out = tl.sum(acc, 1)
        if GATE_UP:
            out_up = tl.sum(acc_up, 1)
    if ROW or BITS == 8:
        sum_sq = tl.sum(tl.reshape(squares, [BLOCK_K]), 0)
    else:   # the low and high halves' squares share one accumulator
        sum_sq = tl.sum(tl.reshape(squares, [BLOCK_K // 2]), 0)
    if GATE_UP:   # as gemv_gate_up_silu
        if NORM:
            inv = 1.0 / tl.sqrt(sum_sq / K + eps)
            out = out * inv
            out_up = out_up * inv
        if HAS_BIAS:
            out += tl.load(b_ptr + rows).to(tl.float32)
            out_up += tl.load(b_ptr + rows_up).to(tl.float32)
        g = out.to(out_ptr.dtype.element_ty).to(tl.float32)
        u = out_up.to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + rows_out, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=row_ok)
    else:         # as gemv
        if NORM:
            out = out / tl.sqrt(sum_sq / K + eps)
        if HAS_BIAS:
            out += tl.load(b_ptr + rows).to(tl.float32)
        if RESIDUAL:
            out = out.to(out_ptr.dtype.element_ty).to(tl.float32) + tl.load(res_ptr + rows).to(tl.float32)
        tl.store(out_ptr + rows_out, out.to(out_ptr.dtype.element_ty), mask=row_ok)


def _launch(x: torch.Tensor, w: PackedWeight, b: torch.Tensor | None, norm: tuple[torch.Tensor, float] | None,
            residual: torch.Tensor | None, n: int, gate_up: bool, config: QConfig | None) -> torch.Tensor:
    k = w.shape[1]
    if x.shape != (1, k):
        raise ValueError(f"qgemv takes x [1, {k}], got {tuple(x.shape)}")
    if x.device != w.device:
        raise ValueError(f"qgemv: x on {x.device}, weight on {w.device}")
    cfg = config or launch_config(n, k, w.fmt, gate_up)
    block_k = tile_k(w.fmt, k, cfg.block_k)
    planes, strides = plane_args(w)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    nw, eps = norm if norm is not None else (x, 0.0)
    _qgemv[(triton.cdiv(n, cfg.block_n),)](
        x.contiguous(), out, b.contiguous() if b is not None else x, nw.contiguous(),
        residual.contiguous() if residual is not None else x, eps, n, k, *planes, *strides,
        **format_constants(w.fmt, k), BLOCK_N=cfg.block_n, BLOCK_K=block_k, **group_shape(w.fmt, block_k),
        HAS_BIAS=b is not None, NORM=norm is not None, RESIDUAL=residual is not None, GATE_UP=gate_up,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def qgemv(x: torch.Tensor, w: PackedWeight, b: torch.Tensor | None = None, *,
          norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None,
          config: QConfig | None = None) -> torch.Tensor:
    """``x`` [1, K], ``w`` packed [N, K] -> [1, N] in x's dtype: ``residual + rms_norm(x, *norm) @ dequant(w).T + b``,
    rounded where :func:`chatcore.layers.triton_gemv.gemv` rounds (``norm``: (weight [K], eps); ``residual``
    [1, N]; each optional). ``config``: a launch shape other than :func:`launch_config`'s."""
    n = w.shape[0]
    if residual is not None and residual.shape != (1, n):
        raise ValueError(f"qgemv's residual is [1, {n}], got {tuple(residual.shape)}")
    return _launch(x, w, b, norm, residual, n, False, config)


def qgemv_gate_up_silu(x: torch.Tensor, w: PackedWeight, b: torch.Tensor | None = None, *,
                       norm: tuple[torch.Tensor, float] | None = None, config: QConfig | None = None) -> torch.Tensor:
    """``x`` [1, K], ``w`` packed [2N, K] (gate rows, then up rows), ``b`` [2N] or None -> silu(gate) * up [1, N]
    in x's dtype, as :func:`chatcore.layers.triton_gemv.gemv_gate_up_silu` rounds it."""
    n2 = w.shape[0]
    if n2 % 2:
        raise ValueError(f"qgemv_gate_up_silu takes a [2N, K] weight, got {n2} rows")
    return _launch(x, w, b, norm, None, n2 // 2, True, config)
