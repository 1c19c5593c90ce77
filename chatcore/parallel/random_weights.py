"""Random weights in the shapes a family declares for a config, made on demand, slice by slice (for
benchmarks of models nobody has on disk here: a rank makes only its own shard, never the whole 70B model).

Values are small (std 0.02; norms and biases 1), so activations stay finite; they mean nothing.
"""

from __future__ import annotations

import zlib

import torch

from chatcore.config import ModelConfig
from chatcore.models import FAMILIES


class RandomWeights:
    """A tensor source (``names`` / ``get`` / ``get_part``) of random weights, made on ``device`` in ``dtype``
    (on a GPU: a 70B model's shard in seconds, never through host memory)."""

    def __init__(self, cfg: ModelConfig, seed: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.shapes = FAMILIES[cfg.family].shapes(cfg)
        self.seed, self.device, self.dtype = seed, torch.device(device), dtype

    def names(self) -> set[str]:
        return set(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def get(self, name: str) -> torch.Tensor:
        return self.get_part(name, (slice(None),))

    def get_part(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        full = self.shapes[name]
        shape = tuple(len(range(*s.indices(n))) for s, n in zip(index + (slice(None),) * len(full), full,
                                                               strict=False))
        if len(full) == 1:
            return torch.ones(shape, device=self.device, dtype=self.dtype)
        g = torch.Generator(self.device).manual_seed(self.seed ^ zlib.crc32(repr((name, index)).encode()))
        return (torch.randn(shape, generator=g, device=self.device, dtype=self.dtype) * 0.02)
