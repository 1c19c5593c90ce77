"""What every rank needs to load its shard: one frozen record, sent by rank 0 to each worker it starts."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from chatcore.checkpoint import LoadOptions

DEFAULT_TIMEOUT_S = 120.0   # a collective that waits longer than this for another rank fails (no hang)


def default_timeout() -> float:
    """``CHATCORE_TP_TIMEOUT`` (seconds) or :data:`DEFAULT_TIMEOUT_S`."""
    return float(os.environ.get("CHATCORE_TP_TIMEOUT") or DEFAULT_TIMEOUT_S)


@dataclass(frozen=True)
class LaunchSpec:
    path: str                    # the model directory or .gguf file (a directory with config.json alone if random)
    world: int                   # number of ranks
    device_type: str             # "cpu" (gloo) or "cuda" (nccl)
    device_index: int            # rank r runs on cuda:(device_index + r)
    dtype: str                   # "float32", "bfloat16", "float16"
    options: LoadOptions         # the caller's runtime options, the same on every rank
    store_port: int              # rank 0's TCPStore (rendezvous) on 127.0.0.1
    timeout_s: float
    random_seed: int | None = None   # benchmarks: random weights of the config's shapes instead of a checkpoint

    def __post_init__(self) -> None:
        if self.world < 1:
            raise ValueError(f"world must be at least 1, got {self.world}")
        if self.device_type not in ("cpu", "cuda"):
            raise ValueError(f"tensor parallel runs on cpu or cuda, not {self.device_type}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")

    @property
    def start_timeout_s(self) -> float:
        """How long starting the ranks may take (their imports and loads): never less than the default."""
        return max(self.timeout_s, DEFAULT_TIMEOUT_S)

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"

    def rank_device(self, rank: int) -> torch.device:
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device("cuda", self.device_index + rank)
