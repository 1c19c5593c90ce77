"""Tensor sources: Hugging Face safetensors directories and GGUF files, both served under HF tensor names."""

from __future__ import annotations

from typing import Protocol

import torch


class TensorSource(Protocol):
    def names(self) -> set[str]: ...

    def get(self, name: str) -> torch.Tensor: ...
