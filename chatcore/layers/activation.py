"""Gated MLP activation of a fused gate/up projection: ``silu(gate) * up`` (one kernel on a GPU).

:func:`gate_up_silu` is the projection and the activation together: for one decode token on a GPU it is one
Triton GEMV with the activation in its epilogue (:func:`chatcore.layers.triton_gemv.gemv_gate_up_silu`) where,
timed once per weight shape (outside any CUDA graph capture), that beats the projection (cuBLAS or the Triton
GEMV, as :func:`chatcore.layers.linear.linear` picks) followed by the ``silu_mul`` kernel. Either way it can
take the RMSNorm before it (``norm``), in the GEMV's prologue where a Triton GEMV runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatcore.layers.linear import linear
from chatcore.layers.norm import rms_norm, use_fused
from chatcore.layers.qmm_choice import packed_kernel
from chatcore.layers.timing import graph_seconds
from chatcore.quant.packed import PackedWeight
from chatcore.quant.weight import Weight

_BLOCKS = (2, 4, 8)   # gate rows per program tried for the fused kernel
_FUSED_CHOICE: dict[tuple[int, int, torch.dtype, bool], int] = {}   # shape -> the fused kernel's rows, 0: unfused


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up`` [T, 2N] (gate then up in each row) -> silu(gate) * up [T, N]."""
    if use_fused(gate_up) and gate_up.dim() == 2:
        from chatcore.layers.triton_fused import silu_mul as fused

        return fused(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gate_up_silu(x: torch.Tensor, w_gate_up: Weight, b_gate_up: torch.Tensor | None = None, *,
                 norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """``silu_mul(linear(x, w_gate_up, b_gate_up, norm=norm))``: ``w_gate_up`` [2N, K] holds the gate rows, then
    the up rows; ``norm``: the RMSNorm (weight, eps) of ``x`` before the projection, or None. A packed
    ``w_gate_up``: on a GPU the fused dequantize GEMV (one token) or GEMM (a few rows, as
    :mod:`chatcore.layers.qmm_choice` picks) with the activation in its epilogue
    (:func:`chatcore.layers.triton_qgemv.qgemv_gate_up_silu`, :func:`chatcore.layers.triton_qmm.qmm_gate_up_silu`);
    otherwise as :func:`linear` runs it."""
    if not isinstance(w_gate_up, torch.Tensor):
        if isinstance(w_gate_up, PackedWeight) and x.dim() >= 2 and use_fused(x):
            kernel = packed_kernel(x.numel() // x.shape[-1], w_gate_up.fmt)
            if kernel == "qgemv" and x.dim() == 2:
                from chatcore.layers.triton_qgemv import qgemv_gate_up_silu

                return qgemv_gate_up_silu(x, w_gate_up, b_gate_up, norm=norm)
            if kernel == "qmm":
                from chatcore.layers.triton_qmm import qmm_gate_up_silu

                h = x if norm is None else rms_norm(x, *norm)
                out = qmm_gate_up_silu(h.reshape(-1, h.shape[-1]), w_gate_up, b_gate_up)
                return out.view(*x.shape[:-1], out.shape[-1])
        return silu_mul(linear(x, w_gate_up, b_gate_up, norm=norm))
    if x.dim() != 2 or x.shape[0] != 1 or not use_fused(x) or not w_gate_up.is_contiguous():
        return silu_mul(linear(x, w_gate_up, b_gate_up, norm=norm))
    key = (w_gate_up.shape[0], w_gate_up.shape[1], w_gate_up.dtype, b_gate_up is not None)
    block = _FUSED_CHOICE.get(key)
    if block is None:
        if torch.cuda.is_current_stream_capturing():
            return silu_mul(linear(x, w_gate_up, b_gate_up, norm=norm))
        block = _FUSED_CHOICE[key] = fastest_fused(x, w_gate_up, b_gate_up)
    if block:
        from chatcore.layers.triton_gemv import gemv_gate_up_silu

        return gemv_gate_up_silu(x, w_gate_up, b_gate_up, block, norm=norm)
    return silu_mul(linear(x, w_gate_up, b_gate_up, norm=norm))


def fastest_fused(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> int:
    """The fused kernel's fastest rows per program, or 0 where the unfused pair is as fast. Both sides are timed
    whole (each in a CUDA graph: the unfused side pays its second kernel), so no margin is added."""
    from chatcore.layers.triton_gemv import gemv_gate_up_silu

    linear(x, w, b)   # settles the projection's own choice before it is timed inside a capture
    unfused = graph_seconds(lambda: silu_mul(linear(x, w, b)))
    times = {block: graph_seconds(lambda block=block: gemv_gate_up_silu(x, w, b, block)) for block in _BLOCKS}
    best = min(times, key=times.__getitem__)
    return best if times[best] < unfused else 0
