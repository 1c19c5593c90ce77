"""Qwen3: the Llama block with an RMSNorm over each q and k head (``q_norm`` / ``k_norm``, before RoPE),
an explicit ``head_dim`` (128 in the released models, not hidden / heads), optional biases on q/k/v/o
(``attention_bias``) and Qwen2's optional sliding windows. GGUF: as Qwen2's (no q/k rows reordered)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from chatcore.config_gguf import GGUFKeys, rope_fields
from chatcore.models import llama, qwen2
from chatcore.models.family import Fields
from chatcore.models.llama import LlamaModel


class Qwen3Model(LlamaModel):
    """``Qwen3ForCausalLM``: ``ModelConfig.qk_norm`` is set for this family."""


def _from_hf(raw: Mapping[str, Any]) -> Fields:
    return {**llama.llama_style_fields(raw), "qk_norm": True, "sliding_windows": qwen2.qwen_windows(raw)}


def _from_gguf(key: GGUFKeys, common: Mapping[str, Any]) -> Fields:
    return {**rope_fields(key, common), "qk_norm": True}


FAMILY = dataclasses.replace(
    qwen2.FAMILY, name="qwen3", label="Qwen3", model=Qwen3Model, hf_architecture="Qwen3ForCausalLM",
    hf_model_type="qwen3", config_from_hf=_from_hf, gguf_arch="qwen3", config_from_gguf=_from_gguf)
