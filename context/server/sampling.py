"""Request fields -> chatcore.SamplingParams fields (a 400 naming the field when one is out of range)."""

from __future__ import annotations

from typing import Any

from .errors import bad_request

# OpenAI's field -> SamplingParams' field; the extra ones (top_k, min_p, repetition_penalty) as vLLM takes them
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty"}


def sampling_fields(body: Any, *, max_tokens: int | None, stop: Any = None, logprobs: bool = False,
                    top_logprobs: int = 0) -> dict[str, Any]:
    """The SamplingParams fields a request sets (the rest stay at their defaults); checked now."""
    out: dict[str, Any] = {}
    for name, target in _FIELDS.items():
        value = getattr(body, name, None)
        if value is not None:
            out[target] = value
    if max_tokens is not None:
        out["max_new_tokens"] = max_tokens
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else list(stop)
        if len(stops) > 16 or not all(isinstance(s, str) and s for s in stops):
            raise bad_request("stop must be a string or a list of at most 16 non-empty strings", "stop")
        out["stop"] = tuple(stops)
    if logprobs:
        out["logprobs"] = True
    if top_logprobs:
        out["top_logprobs"] = top_logprobs
    check(out)
    return out


def check(fields: dict[str, Any]) -> Any:
    """SamplingParams(**fields), or a 400 naming the field it refused."""
    from chatcore.sampling import SamplingParams

    try:
        return SamplingParams(**fields)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        param = next((k for k, v in _FIELDS.items() if f".{v} " in msg), None)
        if param is None and "max_new_tokens" in msg:
            param = "max_tokens"
        raise bad_request(msg, param) from None
