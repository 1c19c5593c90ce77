"""Programmatic dependent launch (PDL) for the decode step's Triton kernels, on GPUs that have it (sm_90+).

A decode step is ~200 small kernels in a row (every layer's projections and attention), each bound by memory.
Launched one after the other, each waits for the previous one to finish before its programs are even placed,
so every kernel pays its launch and its ramp-up on an idle GPU and the tail of its last wave leaves SMs idle.
With PDL a kernel is launched while the previous one is still running: its programs start once every program
of the previous one has begun (``gdc_launch_dependents``, at each kernel's start) and wait, before touching
anything, until the previous kernel has finished and its writes are visible (``gdc_wait``). Results are the
same bit for bit; the gaps between kernels shrink. Captured CUDA graphs keep the dependency edges.

The rule that keeps it correct: every kernel launched with :func:`launch_options` calls ``gdc_wait`` in every
program before its first load or store (the kernels here do it first thing, under their ``PDL`` constexpr), so
each kernel ends only after the previous one has ended and the chain is ordered as without PDL. Kernels
launched without it (cuBLAS, PyTorch's) are ordered as usual.

Off by default until it measures faster (bench/README.md, "PDL"); ``CHATCORE_PDL=1`` turns it on (read once,
at import).
"""

from __future__ import annotations

import functools
import os

import torch

_ENABLED = os.environ.get("CHATCORE_PDL", "0") == "1"


@functools.cache
def _capable(index: int) -> bool:
    try:
        from triton.language.extra import cuda
    except ImportError:
        return False
    has_ops = hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")
    return has_ops and torch.cuda.get_device_capability(index)[0] >= 9


def uses_pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched with PDL (a CUDA device of compute capability 9.0 or more,
    a Triton that has the instructions, and turned on)."""
    if not _ENABLED or device.type != "cuda":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(on: bool) -> dict[str, bool]:
    """The launch keyword that turns PDL on for one Triton launch (nothing when off: the interpreter and older
    Triton releases never see it)."""
    return {"launch_pdl": True} if on else {}
