"""Starting a tensor-parallel engine: rank 0 in the caller's process, ranks 1..N-1 as worker processes
(:mod:`.processes`). The handshake:

1. rank 0 opens and checks the checkpoint and the split (errors here start no process), opens the
   rendezvous store and starts the workers, sending each the :class:`LaunchSpec`;
2. each worker says hello once imported; rank 0 then joins the process group with them;
3. every rank loads its own shard; rank 0 waits for every ``ready``.

A worker that exits or reports an error at any point ends the start with :class:`RankFailed` and no hang:
rank 0 watches the processes while it waits, and every wait has a deadline.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from chatcore.checkpoint import LoadOptions, Opened, Progress, load_engine
from chatcore.engine import Engine
from chatcore.errors import RankFailed, TensorParallelError
from chatcore.parallel.comm import join, leave, master_store
from chatcore.parallel.model import ParallelModel
from chatcore.parallel.processes import Workers
from chatcore.parallel.runner import ShardRunner
from chatcore.parallel.shard import check_divides, load_shard, open_source
from chatcore.parallel.spec import LaunchSpec, default_timeout
from chatcore.runtime import pick_device, pick_dtype


def load_parallel(path: Path, n: int, device: str | torch.device | None, dtype: str | torch.dtype | None,
                  options: LoadOptions = LoadOptions(), *, random_seed: int | None = None,  # noqa: B008 - frozen
                  timeout_s: float | None = None, progress: Progress | None = None,
                  status: Callable[[str], None] | None = None) -> Engine:
    """:func:`chatcore.load` with ``tensor_parallel=n``: an :class:`Engine` on rank 0 driving n-1 worker ranks
    (n == 1: the whole model in this process, as :func:`chatcore.load` loads it).

    ``random_seed``: ``path`` is a directory holding only config.json and every rank makes random weights
    of its shard's shapes (benchmarks). ``timeout_s``: how long a collective or a start-up step may wait
    for another rank (default ``CHATCORE_TP_TIMEOUT``, else 120 s; starting the ranks may take at least 120 s).
    ``progress(done, total)``: called as rank 0 loads its shard's tensors (the others load theirs alongside).
    ``status(message)``: the notice when the window is capped to what each rank's memory holds for its share
    (:mod:`.window`; default: stderr).
    """
    if n < 1:
        raise TensorParallelError(f"tensor_parallel must be at least 1, got {n}")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    opened = open_source(path, random_seed, dev, dt)
    say = status or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if n == 1:
        return load_engine(path, opened, dev, dt, options, progress, say)
    check_divides(opened[0], n)
    _check_devices(dev, n)
    spec = LaunchSpec(path=str(path), world=n, device_type=dev.type, device_index=dev.index or 0,
                      dtype=str(dt).removeprefix("torch."), options=options, store_port=0,
                      timeout_s=timeout_s or default_timeout(), random_seed=random_seed)
    model = start(spec, opened, progress, say)
    return Engine(model, opened[0], model.runtime, opened[2], source=str(path))


def _check_devices(dev: torch.device, n: int) -> None:
    if dev.type == "cuda":
        first, count = dev.index or 0, torch.cuda.device_count()
        if first + n > count:
            raise TensorParallelError(f"tensor_parallel={n} needs {n} GPUs (cuda:{first}..cuda:{first + n - 1}) "
                                      f"but {count} are visible; use fewer ranks")
    elif dev.type != "cpu":
        raise TensorParallelError(f"tensor parallel runs on cpu (gloo) or cuda (NCCL), not {dev.type}")


def start(spec: LaunchSpec, opened: Opened, progress: Progress | None = None,
          status: Callable[[str], None] | None = None) -> ParallelModel:
    """Start ranks 1..N-1, join them and load rank 0's shard of ``opened`` (see the module doc)."""
    if dist.is_initialized():
        gc.collect()   # an engine nobody holds any more may still own the group until it is collected
    if dist.is_initialized():
        raise TensorParallelError("this process already has a torch.distributed process group (another "
                                  "tensor-parallel engine, or the caller's own); close that engine first")
    store = master_store(spec)
    spec = dataclasses.replace(spec, store_port=store.port)
    workers = Workers(spec)
    try:
        workers.wait("hello", spec.start_timeout_s)
        join(spec, 0, store)
        shard = load_shard(spec, 0, opened, progress, status)
        workers.wait("ready", spec.start_timeout_s)
    except BaseException as exc:
        why = None if isinstance(exc, RankFailed) else workers.diagnose(grace=1.0)
        workers.kill()
        leave(abort=True)
        if why:
            raise RankFailed(f"tensor-parallel start failed: {why}") from exc
        raise
    return ParallelModel(ShardRunner(shard, weak=True), opened[0], workers, store)
