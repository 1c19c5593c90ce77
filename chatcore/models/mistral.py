"""Mistral: the Llama block with sliding-window attention on every layer (``sliding_window``), honoured in
prefill and decode by the attention entry point. The KV cache keeps every token (so a slot can still be
truncated or shifted anywhere); attention reads only the window's keys.

GGUF: llama.cpp writes Mistral 7B with architecture ``llama`` and no sliding window (and runs it with full
attention); such a file loads as the Llama family, exactly as llama.cpp runs it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from chatcore.config import ModelConfig
from chatcore.models import llama
from chatcore.models.family import Fields
from chatcore.models.llama import LlamaModel


class MistralModel(LlamaModel):
    """``MistralForCausalLM``: config.json's ``sliding_window`` becomes ``ModelConfig.sliding_windows``."""


def _from_hf(raw: Mapping[str, Any]) -> Fields:
    window = raw.get("sliding_window")
    windows = (int(window),) * int(raw["num_hidden_layers"]) if window else ()
    return {**llama.llama_style_fields(raw), "sliding_windows": windows}


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**llama.llama_style_hf(cfg), "sliding_window": cfg.sliding_windows[0] if cfg.sliding_windows else None}


FAMILY = dataclasses.replace(
    llama.FAMILY, name="mistral", label="Mistral", model=MistralModel, hf_architecture="MistralForCausalLM",
    hf_model_type="mistral", config_from_hf=_from_hf, config_to_hf=_to_hf, gguf_arch=None, config_from_gguf=None,
    gguf_names=None)
