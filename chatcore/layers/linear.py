"""The projection entry point: :func:`linear` (with the RMSNorm before it and the residual add after it) and
:func:`for_linear`, the weight layout it reads fastest.

On the CPU a decode step is a matrix-vector product per weight, bound by memory bandwidth, and MKL's rate
depends on the layout: a weight with at least as many outputs as inputs streams faster stored input-major
([in, out] contiguous, handed to ``F.linear`` as its transposed view), a wide-input weight as stored
([out, in]); GPUs read either layout at full speed (figures: ``bench/README.md``, "chatcore/layers").

A packed weight (:class:`~chatcore.quant.packed.PackedWeight`) is multiplied packed on a GPU (half-precision
activations) by the fused dequantize GEMV for one token (:mod:`chatcore.layers.triton_qgemv`) or the fused
dequantize GEMM for a few rows (:mod:`chatcore.layers.triton_qmm`), as :mod:`chatcore.layers.qmm_choice` picks
by the number of rows; any other product dequantizes it to the activations' dtype for that call alone
(:func:`chatcore.quant.weight.dense`: a prompt chunk pays one dequantization per weight) and keeps nothing.
:class:`~chatcore.quant.weight.RowParts` (rows of different formats) runs each part and concatenates the
outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatcore.layers.gemv_choice import use_triton_gemv
from chatcore.layers.norm import rms_norm, use_fused
from chatcore.layers.qmm_choice import packed_kernel
from chatcore.quant.packed import PackedWeight
from chatcore.quant.weight import RowParts, Weight, dense


def for_linear(w: Weight) -> Weight:
    """``w`` [out, in], laid out for the fastest ``F.linear(x, w)`` on its device (same values and shape); a
    packed weight or :class:`RowParts` as it is."""
    if not isinstance(w, torch.Tensor) or w.device.type != "cpu" or w.dim() != 2 or w.shape[0] < w.shape[1]:
        return w
    return w.t().contiguous().t()


def linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None, *,
           norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + F.linear(rms_norm(x, *norm), w, b)`` (``norm``: (weight, eps); each part optional), except
    that a one-token product on a GPU takes the Triton GEMV where it beats cuBLAS
    (:mod:`chatcore.layers.gemv_choice`); the GEMV then does the norm and the residual add too (no kernel of
    their own). A packed ``w``: see the module docstring."""
    if not isinstance(w, torch.Tensor):
        return _packed_linear(x, w, b, norm, residual)
    if x.dim() == 2 and x.shape[0] == 1 and use_fused(x) and w.stride(1) == 1 and use_triton_gemv(x, w, b):
        from chatcore.layers.triton_gemv import gemv

        return gemv(x, w, b, norm=norm, residual=residual)
    if norm is not None:
        x = rms_norm(x, *norm)
    out = F.linear(x, w, b)
    return out if residual is None else residual + out


def _packed_linear(x: torch.Tensor, w: PackedWeight | RowParts, b: torch.Tensor | None,
                   norm: tuple[torch.Tensor, float] | None, residual: torch.Tensor | None) -> torch.Tensor:
    if isinstance(w, RowParts):
        if norm is not None:
            x = rms_norm(x, *norm)
        biases = [None] * len(w.parts) if b is None else b.split(w.sizes)
        out = torch.cat([linear(x, p, pb) for p, pb in zip(w.parts, biases, strict=True)], dim=-1)
        return out if residual is None else residual + out
    kernel = packed_kernel(x.numel() // x.shape[-1], w.fmt) if x.dim() >= 2 and use_fused(x) else "dense"
    if kernel == "qgemv" and x.dim() == 2:
        from chatcore.layers.triton_qgemv import qgemv

        return qgemv(x, w, b, norm=norm, residual=residual)
    if norm is not None:
        x = rms_norm(x, *norm)
    if kernel == "qmm":
        from chatcore.layers.triton_qmm import qmm

        shape = (*x.shape[:-1], w.shape[0])
        fuse = residual is not None and residual.shape == shape and residual.dtype == x.dtype
        out = qmm(x.reshape(-1, x.shape[-1]), w, b, residual=residual.reshape(-1, shape[-1]) if fuse else None)
        out = out.view(shape)
        return out if residual is None or fuse else residual + out
    out = F.linear(x, dense(w, x.dtype), b)
    return out if residual is None else residual + out
