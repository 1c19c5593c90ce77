"""RoPE and the paged KV write of a batched step in one launch (Triton): the queries rotated into a new tensor,
the keys rotated and the values copied into their rows of the layer's pools.

A batched step's new rows (:class:`~chatcore.batch.step.BatchStep`) otherwise take four launches a layer (q and
k rotated, k and v ``index_copy_``'d), and with one row each (a decode step of one sequence) the rotation is the
plain form's seven element-wise kernels a tensor. Here one program takes one row: every query head, and every
key and value head. The rotation is :func:`chatcore.layers.triton_fused.rotate`'s arithmetic (half-split layout,
float32 from the cos/sin tables in the activations' dtype, rounded once), so the stored keys are bit-identical
to that kernel's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rot(src, cos, sin, ok, HALF: tl.constexpr):
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _store_halves(dst, a, b, ok, HALF: tl.constexpr):
    tl.store(dst, a.to(dst.dtype.element_ty), mask=ok)
    tl.store(dst + HALF, b.to(dst.dtype.element_ty), mask=ok)


@triton.jit
def _rope_write(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, rows_ptr, q_out_ptr, k_pool_ptr, v_pool_ptr,
                q_row, q_head, k_row, k_head, v_row, v_head, HQ, HKV, HALF: tl.constexpr, BLOCK_Q: tl.constexpr,
                BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HALF
    cos = tl.load(cos_ptr + row * HALF + dims, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + row * HALF + dims, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    hq = tl.arange(0, BLOCK_Q)[:, None]
    ok = (hq < HQ) & d_ok[None, :]
    a, b = _rot(q_ptr + row * q_row + hq * q_head + dims[None, :], cos, sin, ok, HALF)
    _store_halves(q_out_ptr + (row * HQ + hq) * (2 * HALF) + dims[None, :], a, b, ok, HALF)
    slot = tl.load(rows_ptr + row).to(tl.int64)
    hk = tl.arange(0, BLOCK_KV)[:, None]
    ok = (hk < HKV) & d_ok[None, :]
    a, b = _rot(k_ptr + row * k_row + hk * k_head + dims[None, :], cos, sin, ok, HALF)
    _store_halves(k_pool_ptr + (slot * HKV + hk) * (2 * HALF) + dims[None, :], a, b, ok, HALF)
    src = v_ptr + row * v_row + hk * v_head + dims[None, :]
    _store_halves(v_pool_ptr + (slot * HKV + hk) * (2 * HALF) + dims[None, :], tl.load(src, mask=ok, other=0.0),
                  tl.load(src + HALF, mask=ok, other=0.0), ok, HALF)


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor) -> bool:
    """Whether :func:`rope_write` takes these: half-precision CUDA tensors of one dtype, unit stride over the
    head dimension (an even size), contiguous pools of that dtype."""
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and d % 2 == 0
            and all(t.dtype == q.dtype and t.stride(-1) == 1 and t.shape[-1] == d for t in (k, v, k_flat, v_flat))
            and k_flat.is_contiguous() and v_flat.is_contiguous())


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               rows: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor) -> torch.Tensor:
    """q [N, Hq, D], k / v [N, Hkv, D] (strided rows and heads allowed: views of a fused projection), cos / sin
    [N, D/2] contiguous (each row's position), ``rows`` long [N] (each row's place in the flattened pools
    ``k_flat`` / ``v_flat`` [R, Hkv, D]). Writes rotated k and v there; returns the rotated q, contiguous."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    if cos.shape != (n, d // 2) or not cos.is_contiguous() or not sin.is_contiguous() or rows.shape != (n,):
        raise ValueError(f"rope_write takes cos/sin [N, D/2] contiguous and rows [N], got {tuple(cos.shape)} / "
                         f"{tuple(rows.shape)} for q {tuple(q.shape)}")
    out = torch.empty((n, hq, d), dtype=q.dtype, device=q.device)
    if n:
        half = d // 2
        _rope_write[(n,)](q, k, v, cos, sin, rows, out, k_flat, v_flat, q.stride(0), q.stride(1), k.stride(0),
                          k.stride(1), v.stride(0), v.stride(1), hq, hkv, HALF=half,
                          BLOCK_Q=triton.next_power_of_2(hq), BLOCK_KV=triton.next_power_of_2(hkv),
                          BLOCK_D=triton.next_power_of_2(half), num_warps=4)
    return out
