"""Device time of GPU work, read from CUDA events: the one timing helper of the run-time kernel choices
(:mod:`chatcore.layers.gemv_choice`, :mod:`chatcore.layers.activation`) and of the GPU benchmarks (``bench/``).

- :func:`event_seconds`: calls as a caller makes them, launch costs included;
- :func:`graph_seconds`: calls captured in a CUDA graph, as a captured decode step runs them (no launch costs).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def _between_events(fn: Callable[[], object]) -> float:
    """Seconds between two CUDA events recorded on the current stream around one call of ``fn``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def event_seconds(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``reps`` calls, each between two CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median([_between_events(fn) for _ in range(reps)])


def graph_seconds(fn: Callable[[], object], reps: int = 20) -> float:
    """Device seconds per call of ``fn``: ``reps`` calls captured in one CUDA graph, so launch costs (which a
    captured decode step does not pay) stay out; best of 3 replays. ``fn`` runs once before, on a side stream
    (the warm-up a capture needs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return min(_between_events(graph.replay) for _ in range(3)) / reps
