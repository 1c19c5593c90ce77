"""Storage fixtures: every store test runs on the embedded Redis and on redis-server over TCP.

The TCP variant uses $CHATCORE_TEST_REDIS_URL (set by .ci/run) and is skipped when it is unset.
One embedded server serves the whole run; each test gets a flushed database.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from _storage_helpers import RedisServer

from storage import Store, StoreConfig
from storage.connect import embedded_path, open_embedded

REPO = Path(__file__).resolve().parents[2]
PROCS = Path(__file__).with_name("_procs.py")
TCP_URL = os.environ.get("CHATCORE_TEST_REDIS_URL")


@dataclass
class Backend:
    name: str
    client: redis.Redis  # for the tests to look and poke at (str replies)
    store_client: redis.Redis  # what the Store gets: bytes replies, as open_store() makes it
    env: dict[str, str]  # what a subprocess needs so that storage.open_store() reaches this Redis

    def store(self, config: StoreConfig | None = None) -> Store:
        return Store(self.store_client, config)

    def run(self, *args: str, **kw: object) -> subprocess.Popen:
        """Start `tests/storage/_procs.py ARGS` against this backend."""
        return subprocess.Popen([sys.executable, str(PROCS), *args], env=self.env, cwd=REPO,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                **kw)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CHATCORE_HOME")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chatcore-home")


@pytest.fixture(scope="session")
def embedded_store(embedded_home: Path) -> Iterator[Store]:
    store = open_embedded(embedded_path(embedded_home))
    yield store
    store.close()


@pytest.fixture(params=["embedded", "tcp"])
def backend(request: pytest.FixtureRequest, embedded_home: Path) -> Iterator[Backend]:
    if request.param == "tcp":
        if not TCP_URL:
            pytest.skip("CHATCORE_TEST_REDIS_URL is not set (.ci/run sets it)")
        client = redis.Redis.from_url(TCP_URL, decode_responses=True)
        b = Backend("tcp", client, redis.Redis.from_url(TCP_URL), _env(REDIS_URL=TCP_URL))
    else:
        embedded = request.getfixturevalue("embedded_store").connection
        client = redis.Redis(unix_socket_path=embedded.socket_file, decode_responses=True)
        b = Backend("embedded", client, embedded, _env(CHATCORE_HOME=str(embedded_home)))
    client.flushdb()
    yield b
    client.flushdb()
    client.close()
    if request.param == "tcp":
        b.store_client.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.store()


@pytest.fixture
def cli_env(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Backend:
    """Point storage.open_store() (as the CLI calls it) at the test backend."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("CHATCORE_HOME", raising=False)
    for k in ("REDIS_URL", "CHATCORE_HOME"):
        if k in backend.env:
            monkeypatch.setenv(k, backend.env[k])
    return backend


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()
