"""Qwen2 / Qwen2.5: the Llama block with biases on the q, k and v projections (not o), and, when
``use_sliding_window`` is set, sliding windows on the layers ``layer_types`` names (older configs: from
``max_window_layers`` on)."""

from __future__ import annotations

from chatcore.models.llama import LlamaModel


class Qwen2Model(LlamaModel):
    """``Qwen2ForCausalLM``: ``ModelConfig.qkv_bias`` is set for this family."""
