"""Qwen3: the Llama block with an RMSNorm over each q and k head (``q_norm`` / ``k_norm``, before RoPE),
an explicit ``head_dim`` (128 in the released models, not hidden / heads), optional biases on q/k/v/o
(``attention_bias``) and Qwen2's optional sliding windows."""

from __future__ import annotations

from chatcore.models.llama import LlamaModel


class Qwen3Model(LlamaModel):
    """``Qwen3ForCausalLM``: ``ModelConfig.qk_norm`` is set for this family."""
