"""What a model family declares, in one record: each family file defines ``FAMILY = Family(...)`` next to its
model class, and generic code (config parsing, GGUF reading, tensor parallel, random weights) reads it
through the registry, :data:`chatcore.models.FAMILIES`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from chatcore.config import ModelConfig
from chatcore.config_gguf import GGUFKeys
from chatcore.errors import UnsupportedArchitecture
from chatcore.models.base import CausalLM
from chatcore.quant.weight import Weight
from chatcore.runtime import Runtime
from chatcore.weights.gguf_names import GGUFNames

Fields = dict[str, Any]                         # ModelConfig keyword arguments
GetTensor = Callable[[str], Weight]   # a tensor, or a packed weight (chatcore.quant.packed)
ModelClass = Callable[[ModelConfig, Runtime, GetTensor, str], CausalLM]   # (cfg, runtime, get, backend)


class RefusedVariant(UnsupportedArchitecture):
    """A family's ``config_from_hf`` refuses one of its variants; :func:`chatcore.checkpoint_config.config_from_hf`
    re-raises it as :class:`UnsupportedArchitecture` with what is supported added to the message."""


def tied_head(cfg: ModelConfig, names: set[str]) -> ModelConfig:
    """A GGUF file without ``lm_head.weight`` (``output.weight``) ties the head to the embedding (the default
    ``settings_from_tensors``: every family's untied head is transformers' ``lm_head.weight``)."""
    return dataclasses.replace(cfg, tie_word_embeddings="lm_head.weight" not in names)


@dataclass(frozen=True)
class Family:
    """One model family: its names, config parsers, GGUF layout, tensor-parallel splits and tensor shapes.

    ``config_from_hf`` / ``config_from_gguf`` return ``ModelConfig`` fields without ``family`` and
    ``position`` (the registry adds them from here) and raise KeyError / TypeError / ValueError on malformed
    input (the registry turns those into :class:`~chatcore.errors.ModelFormatError`).
    """

    name: str                                   # ModelConfig.family
    label: str                                  # how "supported: ..." messages name it
    position: str                               # "rope" or "alibi"
    model: ModelClass
    hf_architecture: str                        # config.json "architectures" (also written by config_to_hf)
    hf_model_type: str                          # config.json "model_type"
    config_from_hf: Callable[[Mapping[str, Any]], Fields]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]   # the family's own config.json fields
    activations: tuple[str, ...]                # hidden_act values its model runs
    shapes: Callable[[ModelConfig], dict[str, tuple[int, ...]]]  # every HF tensor it reads, in load order
    # (HF name suffix, split) pairs for tensor parallel, the first matching suffix wins; names matching none
    # are replicated. Splits: see chatcore.parallel.shard.shard_tensor.
    split_rules: tuple[tuple[str, str], ...]
    gguf_arch: str | None = None                # GGUF general.architecture (None: no GGUF files of its own)
    config_from_gguf: Callable[[GGUFKeys, Mapping[str, Any]], Fields] | None = None  # (keys, common fields)
    gguf_names: GGUFNames | None = None
    # what GGUF metadata does not say but the tensors (under HF names) do: a tied head, biases
    settings_from_tensors: Callable[[ModelConfig, set[str]], ModelConfig] = tied_head
    alibi_slopes: Callable[[ModelConfig], torch.Tensor] | None = None   # per head, for the whole model's heads

    def __call__(self, cfg: ModelConfig, runtime: Runtime, get: GetTensor, backend: str) -> CausalLM:
        """Build the family's model from tensors ``get(name)`` gives (as calling its model class does)."""
        return self.model(cfg, runtime, get, backend)

    def tensor_names(self, cfg: ModelConfig) -> list[str]:
        """Every Hugging Face tensor name the model reads (to check and convert checkpoints)."""
        return list(self.shapes(cfg))
