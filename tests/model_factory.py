"""Small random-weight checkpoints built with transformers, for tests (import: ``from model_factory import ...``)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_llama_dir(path: Path, *, seed: int = 0, **overrides: object) -> Path:
    """Save a small random-weight ``LlamaForCausalLM`` (float32 safetensors) to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, object] = dict(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        initializer_range=0.08, tie_word_embeddings=False, bos_token_id=1, eos_token_id=None,
        pad_token_id=None)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path
