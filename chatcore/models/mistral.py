"""Mistral: the Llama block with sliding-window attention on every layer (``sliding_window``), honoured in
prefill and decode by the attention entry point. The KV cache keeps every token (so a slot can still be
truncated or shifted anywhere); attention reads only the window's keys."""

from __future__ import annotations

from chatcore.models.llama import LlamaModel


class MistralModel(LlamaModel):
    """``MistralForCausalLM``: config.json's ``sliding_window`` becomes ``ModelConfig.layer_windows``."""
