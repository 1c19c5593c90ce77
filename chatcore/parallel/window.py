"""The window memory cap with tensor parallel: :func:`chatcore.checkpoint.fit_window` applied to each rank's
own share (its KV heads' cache and its part of the weights, in the memory free where it runs), the smallest
window any rank can hold served by all of them, with the same notice.

    window, notice = agree_window(spec, rank, local_configs, dtype, wanted, source)   # a collective

A rank's weights count as served: a packed (GGUF or ``quantize=``) tensor by its share of the packed bytes
(:class:`RankWeights`), a float one in the compute dtype; its cache in ``spec.options.kv_dtype`` (one byte an
element and a float32 scale per head for int8 / fp8: :func:`chatcore.checkpoint.window_bytes_per_token`).

Ranks on the CPU share one host's memory, so each counts ``1 / world`` of what is free; a rank on a GPU
counts that GPU's free memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from chatcore.checkpoint import fit_window, free_memory
from chatcore.config import ModelConfig
from chatcore.models import FAMILIES
from chatcore.parallel.spec import LaunchSpec
from chatcore.weights import TensorSource


class RankWeights:
    """The bytes one rank's shard of ``source``'s packed tensors takes (what ``fit_window``'s ``source`` is
    asked): a tensor packed whole in ``packed_nbytes(name)`` bytes, cut to the rank's shape of it (``local``'s
    shapes: rows of its heads / MLP columns / padded vocab, or input columns), takes that share of them. Exact:
    every plane of a packed weight is [rows, columns x a constant], and a shard lies on block boundaries."""

    def __init__(self, source: TensorSource, local: ModelConfig) -> None:
        self.source, self.shapes = source, FAMILIES[local.family].shapes(local)

    def packed_nbytes(self, name: str) -> int | None:
        """The rank's packed bytes of ``name`` (None: a float tensor, counted in the compute dtype)."""
        inner = getattr(self.source, "packed_nbytes", None)
        whole = inner(name) if inner is not None else None
        if whole is None:
            return None
        return whole * math.prod(self.shapes[name]) // math.prod(self.source.shape(name))


def rank_free(dev: torch.device, world: int) -> int | None:
    """Bytes this rank may count on (None: unknown): a GPU's free memory, or its share of the host's."""
    free = free_memory(dev)
    if free is None:
        return None
    return free // world if dev.type == "cpu" else free


def rank_windows(local: Sequence[ModelConfig], dt: torch.dtype, window: int, frees: Sequence[int | None],
                 devices: Sequence[torch.device], source: TensorSource | None = None,
                 kv_dtype: str | None = None) -> tuple[int, str | None]:
    """The window all ranks serve: the smallest ``fit_window`` allows any rank ``r`` (its shard's config
    ``local[r]``, ``frees[r]`` bytes on ``devices[r]``; weights as ``source`` serves them, packed ones by the
    rank's share of their bytes; the cache in ``kv_dtype``), and the notice of the rank that sets it (None: the
    wanted ``window`` fits everywhere, or no rank knows its free memory)."""
    world = len(local)
    best, notice = window, None
    for r, (cfg, free, dev) in enumerate(zip(local, frees, devices, strict=True)):
        rank_weights = RankWeights(source, cfg) if source is not None else None
        fit, said = fit_window(cfg, dev, dt, window, free, source=rank_weights, kv_dtype=kv_dtype)
        if fit < best and said is not None:
            share = " (its share of the host's memory)" if dev.type == "cpu" and world > 1 else ""
            best = fit
            notice = said.replace("chatcore: ", f"chatcore: tensor_parallel={world}, rank {r} ({cfg.num_kv_heads} "
                                  f"KV heads, its part of the weights){share}: ", 1)
    return best, notice


def agree_window(spec: LaunchSpec, rank: int, local: Sequence[ModelConfig], dt: torch.dtype,
                 window: int, source: TensorSource | None = None) -> tuple[int, str | None]:
    """Every rank's free memory (one all-gather of the process group; without one, this rank's stands for
    all), then :func:`rank_windows` with ``source`` (the weights as served) and ``spec.options.kv_dtype``: the
    same answer on every rank."""
    devices = [spec.rank_device(r) for r in range(spec.world)]
    free = rank_free(devices[rank], spec.world)
    if dist.is_available() and dist.is_initialized() and spec.world > 1:
        mine = torch.tensor([-1 if free is None else free], dtype=torch.int64, device=devices[rank])
        parts = [torch.empty_like(mine) for _ in range(spec.world)]
        dist.all_gather(parts, mine)
        frees: list[int | None] = [None if (v := int(t.item())) < 0 else v for t in parts]
    else:
        frees = [free] * spec.world
    return rank_windows(local, dt, window, frees, devices, source, spec.options.kv_dtype)
