"""Device time of a piece of GPU work, shared by the GPU benchmarks: CUDA events around each call."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def event_seconds(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``reps`` calls, each between two CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)
