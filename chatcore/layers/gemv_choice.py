"""Which kernel takes a one-token projection on a GPU: the Triton GEMV (:mod:`chatcore.layers.triton_gemv`)
or cuBLAS, decided once per weight shape by timing both inside a CUDA graph, as a captured decode step runs
them. :func:`chatcore.layers.linear.linear` asks; nothing is timed while a CUDA graph is being captured."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatcore.layers.timing import graph_seconds

_CHOICE: dict[tuple[int, int, torch.dtype, bool], bool] = {}   # (out, in, dtype, bias) -> the GEMV was faster


def use_triton_gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether ``F.linear(x, w, b)`` (x [1, in] on a GPU) runs faster as the Triton GEMV: the choice made for
    this weight shape, timed on its first use outside a capture (during one, before any choice: cuBLAS)."""
    key = (w.shape[0], w.shape[1], w.dtype, b is not None)
    choice = _CHOICE.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return False
        choice = _CHOICE[key] = triton_gemv_wins(x, w, b)
    return choice


def triton_gemv_wins(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Times both now: whether the Triton GEMV takes less than 95% of cuBLAS's device time."""
    from chatcore.layers.triton_gemv import gemv

    return graph_seconds(lambda: gemv(x, w, b)) < 0.95 * graph_seconds(lambda: F.linear(x, w, b))
