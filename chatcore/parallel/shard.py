"""Which part of each weight a rank holds, and loading one rank's shard.

Megatron-style splits over N ranks, rank r:
- attention: column-parallel q / k / v (the rank's own query heads, and the KV heads those heads read),
  row-parallel output projection (the same heads' input columns);
- MLP: column-parallel gate / up (``intermediate / N`` columns each), row-parallel down;
- embedding and output head: vocab-parallel (``ceil(vocab / N)`` rows each, the last rank's padded with
  zero rows);
- norms: replicated; the biases of row-parallel projections are kept by rank 0 alone (zeros elsewhere),
  so the all-reduce adds them once.

Packed (quantized) weights are split packed: output rows are rows of each plane, input columns whole blocks of
the format (a split that would cut a block is refused with :class:`TensorParallelError`), the vocab padding
all-zero planes (zero values).

KV heads: with ``kv_heads >= N`` each rank holds ``kv_heads / N`` of them; with fewer, each holds the one
its query heads share (replicated on ``N / kv_heads`` ranks), so ``N`` must divide ``kv_heads`` or be a
multiple of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from chatcore.checkpoint import Opened, Progress, build_model, make_runtime, open_checked, serve_source
from chatcore.checkpoint_config import config_from_hf_file
from chatcore.config import ModelConfig
from chatcore.errors import TensorParallelError
from chatcore.models.base import CausalLM
from chatcore.parallel.comm import ParallelLayers
from chatcore.parallel.random_weights import RandomWeights
from chatcore.parallel.spec import LaunchSpec
from chatcore.parallel.window import agree_window
from chatcore.quant.weight import BlockCutError, Weight, fuse_rows, pad_rows, slice_weight
from chatcore.runtime import Runtime, pick_dtype
from chatcore.weights import TensorSource


@dataclass(frozen=True)
class RankShard:
    """Rank ``rank`` of ``world``: the ranges of heads, KV heads, MLP columns and vocab rows it holds."""

    cfg: ModelConfig      # the whole model's config
    world: int
    rank: int

    def __post_init__(self) -> None:
        check_divides(self.cfg, self.world)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world}")

    @property
    def heads(self) -> tuple[int, int]:
        n = self.cfg.num_heads // self.world
        return self.rank * n, (self.rank + 1) * n

    @property
    def kv_heads(self) -> tuple[int, int]:
        c = self.cfg
        n = max(1, c.num_kv_heads // self.world)
        first = self.heads[0] // (c.num_heads // c.num_kv_heads)   # the KV head of the rank's first query head
        return first, first + n

    @property
    def columns(self) -> tuple[int, int]:
        n = self.cfg.intermediate_size // self.world
        return self.rank * n, (self.rank + 1) * n

    @property
    def vocab_rows(self) -> int:
        """Rows of the embedding / head each rank holds (the vocab padded to a multiple of ``world``)."""
        return -(-self.cfg.vocab_size // self.world)

    @property
    def vocab(self) -> tuple[int, int]:
        lo = self.rank * self.vocab_rows
        return lo, min(lo + self.vocab_rows, self.cfg.vocab_size)

    def local_config(self) -> ModelConfig:
        """The config of this rank's shard: its own head counts, MLP width and vocab rows."""
        h, kv, cols = self.heads, self.kv_heads, self.columns
        return dataclasses.replace(self.cfg, num_heads=h[1] - h[0], num_kv_heads=kv[1] - kv[0],
                                   intermediate_size=cols[1] - cols[0], vocab_size=self.vocab_rows)


def valid_sizes(cfg: ModelConfig) -> list[int]:
    """The tensor-parallel sizes this model can be split into."""
    return [n for n in range(1, cfg.num_heads + 1) if not _mismatch(cfg, n)]


def _mismatch(cfg: ModelConfig, n: int) -> str | None:
    if cfg.num_heads % n:
        return f"the model's {cfg.num_heads} attention heads"
    if cfg.num_kv_heads % n and n % cfg.num_kv_heads:
        return f"the model's {cfg.num_kv_heads} key/value heads (nor is it a multiple of them)"
    if cfg.intermediate_size % n:
        return f"the model's MLP width of {cfg.intermediate_size}"
    return None


def check_divides(cfg: ModelConfig, n: int) -> None:
    if n < 1:
        raise TensorParallelError(f"tensor_parallel must be at least 1, got {n}")
    what = _mismatch(cfg, n)
    if what is not None:
        sizes = ", ".join(str(s) for s in valid_sizes(cfg))
        raise TensorParallelError(f"tensor_parallel={n} does not divide {what}; use one of {sizes}")


# -- which part of a tensor a rank reads: each family's split_rules, by the name's ending -----------------------
# kinds: vocab (rows), q (rows of the rank's heads), kv (rows of its KV heads), head3 (BLOOM's per-head fused
# qkv rows), qkv (MPT's fused q|k|v: three row ranges), out (input columns of the rank's heads), up (rows of its
# MLP columns), down (its MLP columns as input columns), once (rank 0 only; zeros elsewhere)
def split_kind(family: str, name: str) -> str | None:
    """How ``name`` is split (the family's ``split_rules``); None: replicated."""
    from chatcore.models import FAMILIES

    for suffix, kind in FAMILIES[family].split_rules:
        if name.endswith(suffix):
            return kind
    return None


Read = Callable[[str, tuple[slice, ...]], Weight]


def reader(source: TensorSource) -> Read:
    """Read part of a tensor: only those bytes where the source can (safetensors), else whole then cut (GGUF;
    a packed weight cut packed)."""
    part = getattr(source, "get_part", None)
    if part is not None:
        return part
    return lambda name, index: slice_weight(source.get(name), index)


def shard_tensor(shard: RankShard, family: str, name: str, read: Read) -> Weight | None:
    """This rank's part of ``name`` (None: read it whole, it is replicated)."""
    try:
        return _shard_tensor(shard, family, name, read)
    except BlockCutError as exc:
        c, n = shard.cfg, shard.world
        width = c.num_heads * c.head_dim if split_kind(family, name) == "out" else c.intermediate_size
        fits = ", ".join(str(s) for s in valid_sizes(c) if (width // s) % exc.unit == 0)
        raise TensorParallelError(
            f"tensor_parallel={n} would cut {name} ({exc.fmt}) inside a {exc.unit}-column block of its "
            f"{width} input columns; use one of {fits or '1'}") from None


def _shard_tensor(shard: RankShard, family: str, name: str, read: Read) -> Weight | None:
    kind = split_kind(family, name)
    c, all_ = shard.cfg, slice(None)
    d = c.head_dim
    h0, h1 = shard.heads
    if kind is None:
        return None
    if kind == "vocab":
        lo, hi = shard.vocab
        return pad_rows(read(name, (slice(lo, hi),)), shard.vocab_rows)
    if kind == "q":
        return read(name, (slice(h0 * d, h1 * d),))
    if kind == "kv":
        g0, g1 = shard.kv_heads
        return read(name, (slice(g0 * d, g1 * d),))
    if kind == "head3":
        return read(name, (slice(h0 * 3 * d, h1 * 3 * d),))
    if kind == "qkv":
        width = c.num_heads * d
        return fuse_rows([read(name, (slice(i * width + h0 * d, i * width + h1 * d),)) for i in range(3)])
    if kind == "out":
        return read(name, (all_, slice(h0 * d, h1 * d)))
    i0, i1 = shard.columns
    if kind == "up":
        return read(name, (slice(i0, i1),))
    if kind == "down":
        return read(name, (all_, slice(i0, i1)))
    if kind == "once":
        whole = read(name, (all_,))
        return whole if shard.rank == 0 else torch.zeros_like(whole)
    raise AssertionError(f"unknown split {kind!r}")


def alibi_slopes(cfg: ModelConfig, layout: RankShard) -> torch.Tensor:
    """The ALiBi slopes of this rank's heads (slopes depend on the whole model's head count)."""
    from chatcore.models import FAMILIES

    slopes = FAMILIES[cfg.family].alibi_slopes
    if slopes is None:
        raise ValueError(f"{cfg.family} has no ALiBi slopes")
    full = slopes(cfg)
    h0, h1 = layout.heads
    return full[h0:h1].clone()


def load_shard(spec: LaunchSpec, rank: int, opened: Opened | None = None,
               progress: Progress | None = None, status: Callable[[str], None] | None = None) -> CausalLM:
    """Rank ``rank``'s shard of the model ``spec`` names, reading only its part of each weight, with the
    parallel layers (:class:`ParallelLayers`) that join it to the other ranks.

    ``opened``: the checkpoint as the caller opened and checked it on this rank's device (rank 0 does so
    before it starts the other ranks). ``progress(done, total)``: called as tensors load.
    The window is capped to what every rank's memory holds for its share (:func:`.window.agree_window`, a
    collective, before any weight loads); ``status`` gets the notice when it is (rank 0 passes one).
    """
    dev = spec.rank_device(rank)
    dtype = pick_dtype(spec.dtype, dev)
    cfg, source, _ = opened or open_source(Path(spec.path), spec.random_seed, dev, dtype)
    source = serve_source(source, cfg, dev, spec.options)   # packed / quantized as the caller's options ask
    runtime = make_runtime(cfg, dev, dtype, spec.options)
    local = [RankShard(cfg, spec.world, r).local_config() for r in range(spec.world)]
    window, notice = agree_window(spec, rank, local, dtype, runtime.max_seq_len, source)
    if window < runtime.max_seq_len:
        runtime = dataclasses.replace(runtime, max_seq_len=window)
        if status is not None and notice is not None:
            status(notice)
    return build_shard(cfg, source, RankShard(cfg, spec.world, rank), runtime, progress)


def build_shard(cfg: ModelConfig, source: TensorSource, plan: RankShard, runtime: Runtime,
                progress: Progress | None = None) -> CausalLM:
    """The shard ``plan`` of the model ``cfg`` from ``source`` (whole-model tensors under Hugging Face names,
    dense or packed), on ``runtime``, with its :class:`ParallelLayers` installed (the process group joined)."""
    read = reader(source)

    def get(name: str) -> Weight:
        part = shard_tensor(plan, cfg.family, name, read)
        return source.get(name) if part is None else part

    model = build_model(plan.local_config(), runtime, get, progress)
    if cfg.position == "alibi":
        model.slopes = alibi_slopes(cfg, plan).to(runtime.device)
    return ParallelLayers(plan.rank, plan.world, plan.vocab[0], plan.vocab_rows, cfg.vocab_size).install(model)


def open_source(path: Path, random_seed: int | None, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Opened:
    """The checked checkpoint at ``path``; with ``random_seed``, ``path`` holds a config.json alone and the
    weights are random, made on demand on ``device`` (benchmarks of shapes nobody has on disk)."""
    if random_seed is None:
        return open_checked(path)
    cfg = config_from_hf_file(path / "config.json")
    return cfg, RandomWeights(cfg, random_seed, device, dtype), None
