"""Small random-weight checkpoints built with transformers, for tests (import: ``from model_factory import ...``).

``make_<family>_dir(path, *, seed=0, **overrides)`` for every family in ``chatcore.models.FAMILIES``; the
overrides are the transformers config class's own arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_SMALL: dict[str, object] = dict(
    vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
    initializer_range=0.08, tie_word_embeddings=False, bos_token_id=1, eos_token_id=None,
    pad_token_id=None)


def _save(config_cls: Any, model_cls: Any, path: Path, seed: int, settings: dict[str, object]) -> Path:
    torch.manual_seed(seed)
    model = model_cls(config_cls(**settings)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_llama_dir(path: Path, *, seed: int = 0, **overrides: object) -> Path:
    """Save a small random-weight ``LlamaForCausalLM`` (float32 safetensors) to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save(LlamaConfig, LlamaForCausalLM, path, seed, {**_SMALL, **overrides})


def make_mistral_dir(path: Path, *, seed: int = 0, **overrides: object) -> Path:
    """A small ``MistralForCausalLM`` with a 48-token sliding window (prompts in tests run past it)."""
    from transformers import MistralConfig, MistralForCausalLM

    return _save(MistralConfig, MistralForCausalLM, path, seed, {**_SMALL, "sliding_window": 48, **overrides})


def make_qwen2_dir(path: Path, *, seed: int = 0, **overrides: object) -> Path:
    """A small ``Qwen2ForCausalLM`` (q/k/v biases; no sliding window unless asked)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _save(Qwen2Config, Qwen2ForCausalLM, path, seed, {**_SMALL, **overrides})


def make_qwen3_dir(path: Path, *, seed: int = 0, **overrides: object) -> Path:
    """A small ``Qwen3ForCausalLM`` (q/k norms, explicit head_dim 24 != hidden / heads)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _save(Qwen3Config, Qwen3ForCausalLM, path, seed, {**_SMALL, "head_dim": 24, **overrides})


def make_bloom_dir(path: Path, *, seed: int = 0, **overrides: object) -> Path:
    """A small ``BloomForCausalLM`` (ALiBi, 6 heads: not a power of two, tied head)."""
    from transformers import BloomConfig, BloomForCausalLM

    settings: dict[str, object] = dict(vocab_size=320, hidden_size=48, n_layer=3, n_head=6, layer_norm_epsilon=1e-5,
                                       initializer_range=0.08, bos_token_id=1, eos_token_id=None, pad_token_id=None)
    return _save(BloomConfig, BloomForCausalLM, path, seed, {**settings, **overrides})


def make_mpt_dir(path: Path, *, seed: int = 0, **overrides: object) -> Path:
    """A small ``MptForCausalLM`` (ALiBi with MPT's slopes, 6 heads, tied head)."""
    from transformers import MptConfig, MptForCausalLM

    settings: dict[str, object] = dict(vocab_size=320, d_model=48, n_layers=3, n_heads=6, max_seq_len=512,
                                       layer_norm_epsilon=1e-5, initializer_range=0.08, bos_token_id=1,
                                       eos_token_id=None, pad_token_id=None)
    return _save(MptConfig, MptForCausalLM, path, seed, {**settings, **overrides})


def make_gemma3_dir(path: Path, *, seed: int = 0, **overrides: object) -> Path:
    """A small ``Gemma3ForCausalLM`` (text): sliding layers (window 24) around a full one, head_dim 24 !=
    hidden / heads, query_pre_attn_scalar 20 != head_dim, linear RoPE scaling on the full layer only."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    settings: dict[str, object] = dict(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.08,
        sliding_window=24, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        bos_token_id=2, eos_token_id=None, pad_token_id=0)  # no EOS: generate(min_new_tokens) would ban it
    return _save(Gemma3TextConfig, Gemma3ForCausalLM, path, seed, {**settings, **overrides})


def randomize_biases(path: Path) -> Path:
    """Random biases in a model directory (transformers makes them zero): a bias added twice, on every rank or
    split wrongly across fused parts, then shows in the logits."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    g = torch.Generator().manual_seed(9)
    for name, t in tensors.items():
        if name.endswith(".bias"):
            tensors[name] = torch.randn(t.shape, generator=g) * 0.1
    save_file(tensors, file, metadata={"format": "pt"})
    return path
