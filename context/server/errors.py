"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error the client gets as is: HTTP `status`, and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(404, message, param=param, code=code)


def too_long(message: str, param: str | None = "input") -> APIError:
    return APIError(400, message, param=param, code="context_length_exceeded")


def translate(exc: BaseException) -> APIError:
    """The APIError for an exception from chatcore, context or storage (anything else: a 500)."""
    if isinstance(exc, APIError):
        return exc
    from chatcore.errors import ChatcoreError, PromptTooLong

    from ..errors import ContextOverflow, MessageTooLong, SessionBusy

    if isinstance(exc, SessionBusy):
        return APIError(409, "another request is generating in this conversation; wait for it to finish "
                             "(or cancel it) and retry", code="conversation_busy")
    if isinstance(exc, (PromptTooLong, MessageTooLong, ContextOverflow)):
        return too_long(str(exc))
    try:
        import storage
    except ImportError:  # pragma: no cover - storage is part of the package
        storage = None  # type: ignore[assignment]
    if storage is not None:
        if isinstance(exc, storage.NotFound):
            return not_found(str(exc), code="not_found")
        if isinstance(exc, storage.StoreUnavailable):
            return APIError(503, str(exc), type="server_error", code="storage_unavailable")
        if isinstance(exc, (storage.InvalidInput, storage.MessageTooLarge)):
            return bad_request(str(exc))
        if isinstance(exc, storage.Conflict):
            return APIError(409, str(exc), code="conflict")
        if isinstance(exc, storage.StorageError):
            return APIError(500, str(exc), type="server_error", code="storage_error")
    if isinstance(exc, (ChatcoreError, ValueError)):
        return bad_request(str(exc))
    return APIError(500, f"internal error ({type(exc).__name__}: {exc})", type="server_error")
