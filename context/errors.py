"""Errors a user can act on: one line each, saying what is wrong and what to do."""

from __future__ import annotations

from chatcore.errors import ChatcoreError


class ContextError(ChatcoreError):
    """Base class of the context manager's user-facing errors."""


class MessageTooLong(ContextError):
    """One message does not fit the window even with every other turn pruned."""


class ContextOverflow(ContextError):
    """The parts that are never evicted (system prompt, pinned messages, summary) do not fit."""


class SessionBusy(ContextError):
    """A reply is still streaming in this session."""


class SessionDeleted(ContextError):
    """The session was deleted in storage (by another client) under this one: a turn on it cannot be stored."""


# storage's errors reach front ends through context, imported on first use (storage imports redis).
STORAGE_ERRORS = ("NotFound", "StorageError", "StoreUnavailable")


def __getattr__(name: str) -> type[Exception]:
    if name in STORAGE_ERRORS:
        import storage.errors

        return getattr(storage.errors, name)  # type: ignore[no-any-return]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
