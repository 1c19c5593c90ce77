"""Fixtures shared by the context and TUI test folders (each conftest imports them by name)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
def _embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    store = open_embedded(embedded_path(tmp_path_factory.mktemp("embedded-redis")))
    yield store
    store.close()


@pytest.fixture
def store(_embedded: Store) -> Iterator[Store]:
    """A real embedded Redis, empty at the start and end of each test."""
    _embedded._r.flushdb()
    yield _embedded
    _embedded._r.flushdb()
