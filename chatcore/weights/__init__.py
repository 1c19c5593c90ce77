"""Tensor sources: Hugging Face safetensors directories and GGUF files, both served under HF tensor names."""

from __future__ import annotations

from typing import Protocol

import torch


class TensorSource(Protocol):
    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file's header (no data read)."""
        ...

    def get(self, name: str) -> torch.Tensor: ...
