"""Fixtures shared by the context and TUI test folders (each conftest imports them by name)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from storage import Store
from storage.connect import embedded_path, open_embedded


@pytest.fixture(autouse=True)
def _one_torch_thread(one_thread: None) -> None:
    """Tiny matmuls: one thread (tests/conftest.py's one_thread) avoids oversubscribing a shared machine."""


@pytest.fixture(scope="session")
def _embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    store = open_embedded(embedded_path(tmp_path_factory.mktemp("embedded-redis")))
    yield store
    store.close()


@pytest.fixture
def store(_embedded: Store) -> Iterator[Store]:
    """A real embedded Redis, empty at the start and end of each test."""
    _embedded.connection.flushdb()
    yield _embedded
    _embedded.connection.flushdb()
