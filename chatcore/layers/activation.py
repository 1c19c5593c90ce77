"""Gated MLP activation of a fused gate/up projection: ``silu(gate) * up`` (one kernel on a GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatcore.layers.norm import use_fused


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up`` [T, 2N] (gate then up in each row) -> silu(gate) * up [T, N]."""
    if use_fused(gate_up) and gate_up.dim() == 2:
        from chatcore.layers.triton_fused import silu_mul as fused

        return fused(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
