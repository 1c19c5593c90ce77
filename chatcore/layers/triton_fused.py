"""Fused elementwise kernels (Triton) for the GPU decode step: fewer, fuller launches per layer.

- ``add_rms_norm``: ``x + delta`` (the residual add) and RMSNorm of the sum in one pass: one read of each
  input, the sum written once (rounded to the activations' dtype, as the unfused ops round it), the norm
  computed in float32 from that rounded sum and rounded once after the weight (as ``F.rms_norm``);
- ``silu_mul``: ``silu(gate) * up`` of a fused gate/up projection's output, in float32, rounded once;
- ``rotate``: RoPE (half-split layout) of a prompt chunk's queries or keys [T, H, D], every head of a token
  in one program, in float32 from the tables in the activations' dtype (as the references take them) and
  rounded once: one launch where the unfused form takes seven.

One program per token row. The callers (:mod:`chatcore.layers.norm`, :mod:`chatcore.layers.activation`)
use these on CUDA and plain PyTorch elsewhere; ``TRITON_INTERPRET=1`` runs them on the CPU for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(x_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, eps, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    s = tl.load(x_ptr + row * N + offs, mask=ok, other=0.0).to(tl.float32) \
        + tl.load(d_ptr + row * N + offs, mask=ok, other=0.0).to(tl.float32)
    s = s.to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + row * N + offs, s, mask=ok)
    h = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(h * h, 0) / N + eps)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (h * inv * w).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul(gu_ptr, out_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = col < N
    g = tl.load(gu_ptr + row * 2 * N + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * N + N + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + col, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rotate(x_ptr, out_ptr, cos_ptr, sin_ptr, x_row, x_head, H, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
            BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HALF
    ok = (heads[:, None] < H) & d_ok[None, :]
    cos = tl.load(cos_ptr + row * HALF + dims, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + row * HALF + dims, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    src = x_ptr + row * x_row + heads[:, None] * x_head + dims[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    dst = out_ptr + (row * H + heads[:, None]) * (2 * HALF) + dims[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=ok)


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) * weight) for [T, N] contiguous rows."""
    t, n = x.shape
    x, delta = x.contiguous(), delta.contiguous()
    total, out = torch.empty_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(n)
    _add_rms_norm[(t,)](x, delta, weight, total, out, eps, N=n, BLOCK=block, num_warps=_warps(block))
    return total, out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where ``gate_up`` [T, 2N] holds gate then up in each row."""
    t, n2 = gate_up.shape
    n = n2 // 2
    gate_up = gate_up.contiguous()
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    block = min(4096, triton.next_power_of_2(n))
    _silu_mul[(t, triton.cdiv(n, block))](gate_up, out, N=n, BLOCK=block, num_warps=_warps(block))
    return out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` [T, H, D] (rows of heads may be strided: a slice of a fused projection) rotated by the cos/sin rows
    [T, D/2] (contiguous) of its positions; returns a new contiguous [T, H, D]."""
    t, h, d = x.shape
    if x.stride(2) != 1 or cos.shape != (t, d // 2) or not cos.is_contiguous() or not sin.is_contiguous():
        raise ValueError(f"rotate takes x [T, H, D] with unit stride over D and cos/sin [T, D/2], got "
                         f"{tuple(x.shape)} {x.stride()} / {tuple(cos.shape)}")
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    half = d // 2
    block_d = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(h), max(1, 4096 // block_d))
    _rotate[(t, triton.cdiv(h, block_h))](x, out, cos, sin, x.stride(0), x.stride(1), h, HALF=half,
                                          BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)
    return out
