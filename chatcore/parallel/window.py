"""The window memory cap with tensor parallel: :func:`chatcore.checkpoint.fit_window` applied to each rank's
own share (its KV heads' cache and its part of the weights, in the memory free where it runs), the smallest
window any rank can hold served by all of them, with the same notice.

    window, notice = agree_window(spec, rank, local_configs, dtype, wanted)   # a collective: every rank calls it

Ranks on the CPU share one host's memory, so each counts ``1 / world`` of what is free; a rank on a GPU
counts that GPU's free memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from chatcore.checkpoint import fit_window, free_memory
from chatcore.config import ModelConfig
from chatcore.parallel.spec import LaunchSpec


def rank_free(dev: torch.device, world: int) -> int | None:
    """Bytes this rank may count on (None: unknown): a GPU's free memory, or its share of the host's."""
    free = free_memory(dev)
    if free is None:
        return None
    return free // world if dev.type == "cpu" else free


def rank_windows(local: Sequence[ModelConfig], dt: torch.dtype, window: int, frees: Sequence[int | None],
                 devices: Sequence[torch.device]) -> tuple[int, str | None]:
    """The window all ranks serve: the smallest ``fit_window`` allows any rank ``r`` (its shard's config
    ``local[r]``, ``frees[r]`` bytes on ``devices[r]``), and the notice of the rank that sets it (None: the
    wanted ``window`` fits everywhere, or no rank knows its free memory)."""
    world = len(local)
    best, notice = window, None
    for r, (cfg, free, dev) in enumerate(zip(local, frees, devices, strict=True)):
        fit, said = fit_window(cfg, dev, dt, window, free)
        if fit < best and said is not None:
            share = " (its share of the host's memory)" if dev.type == "cpu" and world > 1 else ""
            best = fit
            notice = said.replace("chatcore: ", f"chatcore: tensor_parallel={world}, rank {r} ({cfg.num_kv_heads} "
                                  f"KV heads, its part of the weights){share}: ", 1)
    return best, notice


def agree_window(spec: LaunchSpec, rank: int, local: Sequence[ModelConfig], dt: torch.dtype,
                 window: int) -> tuple[int, str | None]:
    """Every rank's free memory (one all-gather of the process group; without one, this rank's stands for
    all), then :func:`rank_windows`: the same answer on every rank."""
    devices = [spec.rank_device(r) for r in range(spec.world)]
    free = rank_free(devices[rank], spec.world)
    if dist.is_available() and dist.is_initialized() and spec.world > 1:
        mine = torch.tensor([-1 if free is None else free], dtype=torch.int64, device=devices[rank])
        parts = [torch.empty_like(mine) for _ in range(spec.world)]
        dist.all_gather(parts, mine)
        frees: list[int | None] = [None if (v := int(t.item())) < 0 else v for t in parts]
    else:
        frees = [free] * spec.world
    return rank_windows(local, dt, window, frees, devices)
