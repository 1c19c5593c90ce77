"""RMSNorm computed the way the reference implementations compute it (in float32, then cast back)."""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F


@functools.cache
def _triton_ok() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_fused(x: torch.Tensor) -> bool:
    """Fused Triton kernels serve half-precision activations on a GPU; float32 keeps PyTorch's exact ops."""
    return x.is_cuda and x.dtype != torch.float32 and _triton_ok()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 or x.is_cuda:
        # one fused kernel; the same arithmetic as below when nothing is cast. On a GPU in bf16/fp16 it rounds
        # once (after the weight) where the references round twice: a last-bit difference, for 6 fewer kernels
        return F.rms_norm(x, weight.shape, weight, eps)
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension (BLOOM: with bias; MPT: without)."""
    return F.layer_norm(x, weight.shape, weight, bias, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm: returns (x + delta, rms_norm(x + delta)). One kernel on a GPU."""
    if use_fused(x) and x.dim() == 2:
        from chatcore.layers.triton_fused import add_rms_norm as fused

        return fused(x, delta, weight, eps)
    total = x + delta
    return total, rms_norm(total, weight, eps)
