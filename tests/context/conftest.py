"""Context fixtures: a tiny chat model (random weights, byte-level tokenizer, ChatML), an embedded
Redis flushed per test (as tests/storage does), the demo model's tokenizer without its weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _context_helpers import make_chat_model_dir

from storage import Store
from storage.connect import embedded_path, open_embedded


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The tiny models here do tiny matmuls: one thread avoids oversubscribing a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_model_dir(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def chat_engine(chat_model_dir: Path) -> Any:
    import chatcore

    return chatcore.load(chat_model_dir, device="cpu", dtype="float32", max_seq_len=512)


@pytest.fixture(scope="session")
def _embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    store = open_embedded(embedded_path(tmp_path_factory.mktemp("ctx-redis")))
    yield store
    store.close()


@pytest.fixture
def store(_embedded: Store) -> Iterator[Store]:
    _embedded._r.flushdb()
    yield _embedded
    _embedded._r.flushdb()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_gguf: Path) -> Any:
    from chatcore.loader import open_checkpoint

    return open_checkpoint(demo_gguf)[2]
