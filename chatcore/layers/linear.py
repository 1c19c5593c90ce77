"""Weight layout for ``F.linear``.

On the CPU a decode step is a matrix-vector product per weight, bound by memory bandwidth, and MKL's
rate depends on the layout. Measured on this project's 2-core machines (float32, weights streamed from
memory): a weight with at least as many outputs as inputs streams 1.1-1.9x faster stored input-major
([in, out] contiguous, handed to ``F.linear`` as its transposed view) - 13.8 -> 25.5 GB/s for a 49152x576
head, 13.0 -> 21.4 GB/s for 3072x576 - while a wide-input weight (576x1536) is faster as stored
([out, in]: 16.2 vs 13.0 GB/s). GPUs read either layout at full speed, so there nothing changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatcore.layers.norm import rms_norm, use_fused

_GEMV_CHOICE: dict[tuple[int, int, torch.dtype, bool], bool] = {}   # shape -> the Triton kernel was faster


def for_linear(w: torch.Tensor) -> torch.Tensor:
    """``w`` [out, in], laid out for the fastest ``F.linear(x, w)`` on its device (same values and shape)."""
    if w.device.type != "cpu" or w.dim() != 2 or w.shape[0] < w.shape[1]:
        return w
    return w.t().contiguous().t()


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *,
           norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + F.linear(rms_norm(x, *norm), w, b)`` (``norm``: (weight, eps); each part optional), except
    that a one-token product on a GPU takes the Triton GEMV where, timed once per weight shape (outside any
    CUDA graph capture), it beats cuBLAS; the GEMV then does the norm and the residual add too (no kernel of
    their own)."""
    if x.dim() == 2 and x.shape[0] == 1 and use_fused(x) and w.stride(1) == 1:
        key = (w.shape[0], w.shape[1], w.dtype, b is not None)
        choice = _GEMV_CHOICE.get(key)
        if choice is None and not torch.cuda.is_current_stream_capturing():
            choice = _GEMV_CHOICE[key] = _triton_gemv_wins(x, w, b)
        if choice:
            from chatcore.layers.triton_gemv import gemv

            return gemv(x, w, b, norm=norm, residual=residual)
    if norm is not None:
        x = rms_norm(x, *norm)
    out = F.linear(x, w, b)
    return out if residual is None else residual + out


def _triton_gemv_wins(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    from chatcore.layers.triton_gemv import gemv

    return gpu_time(lambda: gemv(x, w, b)) < 0.95 * gpu_time(lambda: F.linear(x, w, b))


def gpu_time(fn, reps: int = 20) -> float:  # noqa: ANN001
    """Device seconds per call of ``fn``: ``reps`` calls captured in a CUDA graph, so launch costs (which a
    captured decode step does not pay) stay out; best of 3 replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return min(times)
