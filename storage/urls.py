"""Redis URLs without their secrets: the one redaction every message, log line and repr goes through.

redis-py (`redis.connection.parse_url`) reads credentials from the userinfo (`user:password@`) and
from query parameters by name (`?password=`, and `?ssl_password=` for rediss://, passed on to the
connection), percent-decoding both. Redaction hides all of them, whatever the case of the name or
how it is percent-encoded, and also a lone userinfo (`redis://secret@host`), which some clients
read as a password.
"""

from __future__ import annotations

from urllib.parse import unquote, unquote_plus, urlsplit

HIDDEN = "***"
UNPARSABLE = "<a Redis URL that could not be parsed>"


def redact_url(url: str) -> str:
    """`url` with every credential in it replaced by `***`; text that is not a URL comes back as it is.

    A URL whose `@` falls outside its userinfo (an unencoded `#`, `?` or `/` in a password) is shown
    as `scheme://***`: where its secret ends cannot be told. Never raises."""
    try:
        scheme, sep, rest = url.partition("://")
        if not sep:
            return url
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            user, _, hostport = netloc.rpartition("@")
            name, colon, _ = user.partition(":")
            netloc = f"{name}:{HIDDEN}@{hostport}" if colon else f"{HIDDEN}@{hostport}"
        elif "@" in rest:
            return f"{scheme}://{HIDDEN}"
        query = "&".join(_redact_param(p) for p in parts.query.split("&")) if parts.query else ""
        return (f"{scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
                + (f"#{parts.fragment}" if parts.fragment else ""))
    except (ValueError, TypeError, AttributeError):
        return UNPARSABLE


def url_secrets(url: str) -> list[str]:
    """Every secret in `url` as written and as decoded, longest first (to scrub other text with)."""
    found: set[str] = set()
    try:
        parts = urlsplit(url)
        user = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
        name, colon, password = user.partition(":")
        found.update((password, unquote(password)) if colon else (name, unquote(name)))
        for p in parts.query.split("&"):
            key, eq, value = p.partition("=")
            if eq and _is_secret(key):
                found.update((value, unquote(value), unquote_plus(value)))
    except (ValueError, TypeError, AttributeError):
        pass
    return sorted((s for s in found if s), key=len, reverse=True)


def scrub(text: str, secrets: list[str] | tuple[str, ...]) -> str:
    """`text` with each of `secrets` replaced by `***`."""
    for s in secrets:
        if s:
            text = text.replace(s, HIDDEN)
    return text


def _is_secret(name: str) -> bool:
    return "password" in unquote_plus(name).strip().lower()


def _redact_param(piece: str) -> str:
    key, eq, _ = piece.partition("=")
    return f"{key}={HIDDEN}" if eq and _is_secret(key) else piece
