"""Matrix-vector product for one decode token (Triton): ``x [1, K] @ w[N, K].T (+ b)``.

A decode step's projections are matrix-vector products bound by reading the weight once. cuBLAS reaches
the copy bandwidth on most shapes but not on all (measured on the H100: a square 4096x4096 weight at
1.6 TB/s against 2.9 for the MLP's); :func:`chatcore.layers.linear.linear` times both once per shape and
keeps the faster. Each program reduces BLOCK_N rows over K in BLOCK_K steps (row-major weight: coalesced
along K), accumulating in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv(x_ptr, w_ptr, b_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          HAS_BIAS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    out = tl.sum(acc, 1)
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [1, K] (contiguous), ``w`` [N, K] row-major -> [1, N] in x's dtype."""
    n, k = w.shape
    if x.shape != (1, k) or w.stride() != (k, 1):
        raise ValueError(f"gemv takes x [1, {k}] and a row-major weight, got {tuple(x.shape)} / {w.stride()}")
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_n = 8 if n >= 2048 else 4
    block_k = min(512, triton.next_power_of_2(k))
    _gemv[(triton.cdiv(n, block_n),)](x.contiguous(), w, b if b is not None else w, out, n, K=k, BLOCK_N=block_n,
                                      BLOCK_K=block_k, HAS_BIAS=b is not None, num_warps=4, num_stages=4)
    return out
