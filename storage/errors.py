"""One exception hierarchy for storage; every message is one line: what is wrong, what to do."""

from __future__ import annotations

from .urls import redact_url


class StorageError(Exception):
    """Base class of every error raised by `storage`."""


class StoreUnavailable(StorageError):
    """Redis cannot be reached (down, refused, timed out, wrong password) or failed to start."""

    def __init__(self, where: str, reason: str, hint: str = "") -> None:
        self.where = where = redact_url(where)
        self.reason = reason
        hint = hint or "start it, or point REDIS_URL (or --redis-url) at a running Redis"
        super().__init__(f"cannot reach Redis at {where}: {reason.rstrip('.')}; {hint}")


class CorruptRecord(StorageError):
    """Data under one of our keys is not what we wrote (foreign, truncated or hand-edited)."""

    def __init__(self, key: str, detail: str) -> None:
        self.key = key
        self.detail = detail
        super().__init__(
            f"corrupt record at Redis key {key!r}: {detail}; export or delete that session "
            "(other sessions are unaffected)"
        )


class SchemaVersionError(StorageError):
    """A record was written by a newer (or unknown) schema than this code understands."""

    def __init__(self, key: str, found: object, supported: int) -> None:
        self.key = key
        self.found = found
        self.supported = supported
        super().__init__(
            f"record at Redis key {key!r} has schema version {found!r}, this chatcore reads up to "
            f"{supported}; upgrade chatcore to open it"
        )


class MessageTooLarge(StorageError, ValueError):
    """A message (or system prompt) is over the configured per-message limit."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"message is {size:,} bytes, over the {limit:,}-byte limit per message; "
            "split it or raise StoreConfig.max_message_bytes"
        )


class NotFound(StorageError, LookupError):
    """A session or message does not exist (never did, or was deleted)."""

    def __init__(self, what: str, ident: str, hint: str = "") -> None:
        self.what = what
        self.ident = ident
        super().__init__(f"no {what} {ident!r}{'; ' + hint if hint else ''}")


class Conflict(StorageError):
    """A write collided with existing data (same id, different content) or kept losing a race."""


class InvalidInput(StorageError, ValueError):
    """An argument or an imported file is not acceptable; the message says which and why."""
