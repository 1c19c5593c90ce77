"""The store's plumbing: configuration, Redis error translation, WATCH transactions, liveness."""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from redis import exceptions as rx

from .errors import Conflict, CorruptRecord, StorageError, StoreUnavailable
from .keys import SESSION_KINDS, key
from .urls import redact_url, scrub

log = logging.getLogger("storage")
T = TypeVar("T")
_EXPECTED_TYPES = {"meta": "hash", "msgs": "hash", "live": "hash", "resp": "hash"}
_HOST = socket.gethostname()
_WARNED: weakref.WeakSet[Any] = weakref.WeakSet()  # connection pools already warned about (once each)


@dataclass(frozen=True)
class StoreConfig:
    """Limits and streaming policy. Checked on creation."""

    max_message_bytes: int = 8 * 1024 * 1024
    checkpoint_tokens: int = 64  # a streaming reply is saved at least every this many tokens...
    checkpoint_interval: float = 1.0  # ...and at least this often (seconds) while tokens arrive
    stale_after: float = 60.0  # a streaming reply with no heartbeat for this long reads as incomplete
    keepalive: float | None = 10.0  # heartbeat period of a writer's background thread (None: off)
    timeout: float = 2.0  # seconds one socket connect / read / write may take; a command fails within ~2x this

    @property
    def bound(self) -> float:
        """The longest one storage call blocks on a hung or dead Redis: one try and one retry."""
        return 2 * self.timeout + 0.5

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1:
            raise ValueError("max_message_bytes must be at least 1")
        if self.checkpoint_tokens < 1 or self.checkpoint_interval <= 0:
            raise ValueError("checkpoint_tokens must be >= 1 and checkpoint_interval > 0")
        if self.stale_after <= 0:
            raise ValueError("stale_after must be > 0")
        if self.keepalive is not None and not 0 < self.keepalive < self.stale_after:
            raise ValueError("keepalive must be > 0 and shorter than stale_after")
        if not 0 < self.timeout <= 300:
            raise ValueError("timeout must be > 0 and at most 300 seconds")


def describe_client(client: Any) -> str:
    """Where a client points, without credentials: host:port/db or the unix socket path."""
    try:
        kw = client.connection_pool.connection_kwargs
    except AttributeError:
        return "redis"
    if kw.get("path"):
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    return f"redis://{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"


def live_value() -> str:
    """What a streaming reply stores as its heartbeat: milliseconds, pid, host."""
    return f"{int(time.time() * 1000)} {os.getpid()} {_HOST}"


def writer_alive(raw: str | None, now: float, stale_after: float) -> bool:
    """Whether a streaming reply's writer looks alive: recent heartbeat, and (same host) pid alive."""
    if raw is None:
        return False
    parts = raw.split(" ", 2)
    try:
        beat = int(parts[0]) / 1000.0
        pid = int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return False
    if now - beat > stale_after:
        return False
    if len(parts) == 3 and parts[2] == _HOST and pid > 0 and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def unbounded_timeouts(client: Any) -> list[str]:
    """The socket timeouts of `client`'s connections that are unbounded (None: a hung Redis blocks a call
    for ever), as redis-py names them; [] when they are bounded or the client is not a redis-py one."""
    try:
        pool = client.connection_pool
        conn = pool.connection_class(**pool.connection_kwargs)  # made, not connected
    except Exception:  # noqa: BLE001 - not a redis-py client (a fake, a cluster): nothing to say
        return []
    return [name for name in ("socket_timeout", "socket_connect_timeout")
            if hasattr(conn, name) and getattr(conn, name) is None]


def warn_if_unbounded(client: Any, where: str) -> bool:
    """Log one warning per connection pool whose timeouts are unbounded; True if it warned now."""
    names = unbounded_timeouts(client)
    pool = getattr(client, "connection_pool", None)
    if not names or pool is None or pool in _WARNED:
        return False
    _WARNED.add(pool)
    log.warning("storage: the Redis client handed to Store (%s) has no %s, so a hung Redis can block a "
                "storage call (and a reply's stream) indefinitely; chatcore keeps a caller's client as it is: "
                "make it with storage.client_options() (or set socket_timeout / socket_connect_timeout), or use "
                "storage.open_store(url)", where, " or ".join(names))
    return True


class StoreBase:
    """Holds the client and translates every Redis failure into one of our errors.

    `connection` is the redis-py client the store was handed (public, as in rq's results): for a
    pipeline of one's own, server commands, or a test flushing its database. Writing our keys through
    it bypasses the store's checks.

    A client handed in keeps its own settings (timeouts, retries, health check): the store never changes
    a client it does not own, which may be shared with code that relies on them. So the bound on a hung
    Redis (`StoreConfig.bound`) holds for the clients `open_store()` makes, and for a caller's client made
    with `storage.client_options(config)`; for any other, the caller's own timeouts apply, and when they
    are unbounded (socket_timeout=None) the store logs one warning per client saying so."""

    def __init__(self, client: Any, config: StoreConfig | None = None, *, where: str | None = None,
                 secrets: Sequence[str] = (), on_close: Callable[[], None] | None = None) -> None:
        self.connection = client
        self.config = config or StoreConfig()
        self.where = redact_url(where) if where else describe_client(client)
        try:
            own = client.connection_pool.connection_kwargs.get("password")
        except AttributeError:
            own = None
        found = (*secrets, own)  # a client handed in may hold a password no URL told us
        self._secrets = tuple(sorted({s for s in found if isinstance(s, str) and s}, key=len, reverse=True))
        self._on_close = on_close
        warn_if_unbounded(client, self.where)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.where})"

    def __enter__(self) -> StoreBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release connections (and stop the embedded server if this was its last user)."""
        try:
            if self._on_close is not None:
                self._on_close()
            else:
                self.connection.close()
        except Exception as exc:  # closing must never raise
            log.debug("closing %s: %s", self.where, self._scrub(str(exc)))

    def ping(self) -> None:
        """Raise StoreUnavailable unless Redis answers."""
        with self._guard():
            self.connection.ping()

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    @contextmanager
    def _guard(self, session_id: str | None = None) -> Iterator[None]:
        try:
            yield
        except rx.WatchError:
            raise
        except rx.AuthenticationError as exc:
            raise self._auth_error(str(exc)) from None
        except rx.BusyLoadingError:
            raise StoreUnavailable(self.where, "Redis is still loading its data; retry shortly") from None
        except (rx.ConnectionError, rx.TimeoutError, OSError) as exc:
            raise StoreUnavailable(self.where, self._scrub(str(exc)) or type(exc).__name__) from None
        except rx.ResponseError as exc:
            raise self._translate(exc, session_id) from None
        except UnicodeDecodeError:  # only with a client made with decode_responses=True
            where = f"chatcore:{{{session_id}}}:*" if session_id else "chatcore:*"
            raise CorruptRecord(where, "holds bytes that are not UTF-8 (use a client with "
                                       "decode_responses=False to find which)") from None

    def _translate(self, exc: rx.ResponseError, session_id: str | None) -> StorageError:
        msg = self._scrub(str(exc))
        if "WRONGTYPE" in msg and session_id is not None:
            return self._diagnose(session_id) or CorruptRecord(f"chatcore:{{{session_id}}}:*", msg)
        if "NOAUTH" in msg or "WRONGPASS" in msg:
            return self._auth_error(msg)
        for marker, reason in (("READONLY", "it is a read-only replica; point at the primary"),
                               ("OOM", "Redis is out of memory (maxmemory); free memory or raise it"),
                               ("MISCONF", "Redis cannot persist to disk; check its disk and logs")):
            if marker in msg:
                return StoreUnavailable(self.where, reason, "fix the server, then retry")
        return StorageError(f"Redis refused a command: {msg}; report this with the command that failed")

    def _auth_error(self, msg: str) -> StoreUnavailable:
        if not self._secrets or "NOAUTH" in msg:  # we sent no password
            return StoreUnavailable(self.where, "it requires a password",
                                    "put it in the URL: redis://:PASSWORD@host:port/db")
        return StoreUnavailable(self.where, "authentication failed", "check the user and password in the URL")

    def _diagnose(self, session_id: str) -> CorruptRecord | None:
        """Find which of a session's keys holds a foreign type (after a WRONGTYPE reply)."""
        try:
            pipe = self.connection.pipeline(transaction=False)
            names = [key(kind, session_id) for kind in SESSION_KINDS]
            for name in names:
                pipe.type(name)
            types = pipe.execute()
        except rx.RedisError:
            return None
        for kind, name, found in zip(SESSION_KINDS, names, types, strict=True):
            found = found.decode() if isinstance(found, bytes) else found
            if found not in ("none", _EXPECTED_TYPES[kind]):
                return CorruptRecord(name, f"is a Redis {found}, expected a {_EXPECTED_TYPES[kind]}")
        return None

    def _transact(self, session_id: str, body: Callable[[Any], T], attempts: int = 50) -> T:
        """Run `body(pipe)` under WATCH of the session record: reads first, `pipe.multi()`, writes.

        Every change to a session's branch structure goes through its record (the append script
        moves the tip), so watching it is enough to detect any concurrent writer; we retry then.
        """
        meta = key("meta", session_id)
        for attempt in range(attempts):
            with self._guard(session_id), self.connection.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(meta)
                    result = body(pipe)
                    pipe.execute()
                    return result
                except rx.WatchError:
                    time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise Conflict(f"session {session_id!r} kept changing under {attempts} attempts to update it; "
                       "retry when the other writer is done")
