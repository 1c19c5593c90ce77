"""Context fixtures: a tiny chat model (random weights, byte-level tokenizer, ChatML), an embedded
Redis flushed per test (as tests/storage does), the demo model's tokenizer without its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _context_helpers import make_chat_model_dir
from _shared_fixtures import _embedded, _one_torch_thread, store  # noqa: F401  (fixtures)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_model_dir(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def chat_engine(chat_model_dir: Path) -> Any:
    import chatcore

    return chatcore.load(chat_model_dir, device="cpu", dtype="float32", max_seq_len=512)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_gguf: Path) -> Any:
    from chatcore.loader import open_checkpoint

    return open_checkpoint(demo_gguf)[2]
