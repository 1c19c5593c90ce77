"""Matrix-vector product for one decode token (Triton): ``x [1, K] @ w[N, K].T (+ b)``.

A decode step's projections are matrix-vector products bound by reading the weight once. cuBLAS reaches
the copy bandwidth on most shapes but not on all (``bench/README.md``, "chatcore/layers"), so
:mod:`chatcore.layers.gemv_choice` times both once per shape and :func:`chatcore.layers.linear.linear` keeps
the faster. Each program reduces BLOCK_N rows over K in BLOCK_K steps (row-major weight: coalesced
along K), accumulating in float32. It can take the RMSNorm before the product into its prologue and the
residual add after it into its epilogue, so a decode step needs no separate kernel for them.

:func:`gemv_gate_up_silu` is the gated MLP's first half in one launch: ``silu(x @ Wg.T) * (x @ Wu.T)`` from the
fused gate/up weight (gate rows first, then up rows), each program reducing BLOCK_N gate rows and the
matching up rows, so the [1, 2I] product never goes to memory and the separate ``silu_mul`` launch goes away.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv(x_ptr, w_ptr, b_ptr, out_ptr, nw_ptr, res_ptr, eps, N, K: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if NORM:   # RMSNorm of x folded in: its weight here, its 1/rms (a per-row constant) after the sum
            squares += x * x
            x = x * tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    out = tl.sum(acc, 1)
    if NORM:
        out = out / tl.sqrt(tl.sum(squares, 0) / K + eps)
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if RESIDUAL:   # rounded as the unfused product is, then added to the residual stream and rounded once more
        out = out.to(out_ptr.dtype.element_ty).to(tl.float32) + tl.load(res_ptr + rows, mask=row_ok).to(tl.float32)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *,
         norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [1, K] (contiguous), ``w`` [N, K] row-major -> [1, N] in x's dtype:
    ``residual + rms_norm(x, *norm) @ w.T + b``, where ``norm`` is (weight [K], eps) and ``residual`` is [1, N]
    (each optional; the norm is computed in float32 from x in every program, which reads all of x anyway)."""
    n, k = w.shape
    if x.shape != (1, k) or w.stride() != (k, 1):
        raise ValueError(f"gemv takes x [1, {k}] and a row-major weight, got {tuple(x.shape)} / {w.stride()}")
    if residual is not None and residual.shape != (1, n):
        raise ValueError(f"gemv's residual is [1, {n}], got {tuple(residual.shape)}")
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_n = 8 if n >= 2048 else 4
    block_k = min(512, triton.next_power_of_2(k))
    nw, eps = norm if norm is not None else (w, 0.0)
    _gemv[(triton.cdiv(n, block_n),)](x.contiguous(), w, b if b is not None else w, out, nw.contiguous(),
                                      residual.contiguous() if residual is not None else w, eps, n, K=k,
                                      BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=b is not None,
                                      NORM=norm is not None, RESIDUAL=residual is not None, num_warps=4, num_stages=4)
    return out


@triton.jit
def _gemv_gate_up_silu(x_ptr, w_ptr, b_ptr, out_ptr, nw_ptr, eps, N, K: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)   # gate rows; their up rows are N further
    row_ok = rows < N
    gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if NORM:   # as in _gemv
            squares += x * x
            x = x * tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        wg = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0)
        wu = tl.load(w_ptr + (rows + N)[:, None] * K + cols[None, :], mask=mask, other=0.0)
        gate += wg.to(tl.float32) * x[None, :]
        up += wu.to(tl.float32) * x[None, :]
    g = tl.sum(gate, 1)
    u = tl.sum(up, 1)
    if NORM:
        inv = 1.0 / tl.sqrt(tl.sum(squares, 0) / K + eps)
        g = g * inv
        u = u * inv
    if HAS_BIAS:
        g += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        u += tl.load(b_ptr + N + rows, mask=row_ok, other=0.0).to(tl.float32)
    # rounded to the activations' dtype first, as the unfused projection's output is, then one more rounding
    g = g.to(out_ptr.dtype.element_ty).to(tl.float32)
    u = u.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + rows, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv_gate_up_silu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, block_n: int = 4, *,
                      norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """``x`` [1, K], ``w`` [2N, K] row-major (gate rows, then up rows), ``b`` [2N] or None, ``norm``: RMSNorm
    (weight [K], eps) of x first, or None -> silu(gate) * up [1, N] in x's dtype. ``block_n``: gate rows per
    program (as many up rows again)."""
    n2, k = w.shape
    if x.shape != (1, k) or w.stride() != (k, 1) or n2 % 2:
        raise ValueError(f"gemv_gate_up_silu takes x [1, {k}] and a row-major [2N, K] weight, "
                         f"got {tuple(x.shape)} / {tuple(w.shape)} {w.stride()}")
    n = n2 // 2
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_k = min(512, triton.next_power_of_2(k))
    nw, eps = norm if norm is not None else (w, 0.0)
    _gemv_gate_up_silu[(triton.cdiv(n, block_n),)](x.contiguous(), w, b if b is not None else w, out, nw.contiguous(),
                                                   eps, n, K=k, BLOCK_N=block_n, BLOCK_K=block_k,
                                                   HAS_BIAS=b is not None, NORM=norm is not None, num_warps=4,
                                                   num_stages=4)
    return out
