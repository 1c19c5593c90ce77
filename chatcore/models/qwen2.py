"""Qwen2 / Qwen2.5: the Llama block with biases on the q, k and v projections (not o), and, when
``use_sliding_window`` is set, sliding windows on the layers ``layer_types`` names (older configs: from
``max_window_layers`` on). GGUF ``qwen2`` files keep transformers' q/k row order (llama.cpp runs them with
NeoX-style RoPE), so nothing is undone for them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from chatcore.config import ModelConfig
from chatcore.config_gguf import GGUFKeys, rope_fields
from chatcore.models import llama
from chatcore.models.family import Fields
from chatcore.models.llama import LlamaModel


class Qwen2Model(LlamaModel):
    """``Qwen2ForCausalLM``: ``ModelConfig.qkv_bias`` is set for this family."""


def qwen_windows(raw: Mapping[str, Any]) -> tuple[int, ...]:
    """Per-layer sliding windows of a Qwen2/3 ``config.json``: ``layer_types`` (or, in older configs,
    ``use_sliding_window`` from layer ``max_window_layers`` on), as their transformers configs decide."""
    layers = int(raw["num_hidden_layers"])
    window = raw.get("sliding_window")
    if not window or not raw.get("use_sliding_window", False):
        return ()
    types = raw.get("layer_types")
    if not types:
        start = int(raw.get("max_window_layers", layers))
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(layers)]
    out = tuple(int(window) if t == "sliding_attention" else 0 for t in types)
    return out if any(out) else ()


def qwen_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A Qwen2/3 ``config.json``'s own fields: Llama's, and the windows on the layers ``layer_types`` names."""
    out = llama.llama_style_hf(cfg)
    if cfg.sliding_windows:
        out.update(use_sliding_window=True, sliding_window=max(cfg.sliding_windows),
                   layer_types=["sliding_attention" if w else "full_attention" for w in cfg.sliding_windows])
    return out


def _from_hf(raw: Mapping[str, Any]) -> Fields:
    return {**llama.llama_style_fields(raw), "qkv_bias": True, "sliding_windows": qwen_windows(raw)}


def _from_gguf(key: GGUFKeys, common: Mapping[str, Any]) -> Fields:
    return {**rope_fields(key, common), "qkv_bias": True}


FAMILY = dataclasses.replace(
    llama.FAMILY, name="qwen2", label="Qwen2", model=Qwen2Model, hf_architecture="Qwen2ForCausalLM",
    hf_model_type="qwen2", config_from_hf=_from_hf, config_to_hf=qwen_hf, gguf_arch="qwen2",
    config_from_gguf=_from_gguf, gguf_names=dataclasses.replace(llama.GGUF_NAMES, reorder={}))
