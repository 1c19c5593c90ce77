"""`--policy`: context options for a replay, as `key=value` pairs.

    --policy high=0.8,low=0.5 --policy kv=shift --policy layout=pinned-last
    --policy @policy.json          # a JSON object with the same keys

Keys (aliases in brackets): reply_reserve [reserve], high_watermark [high], low_watermark [low],
layout (`default`, `pinned-last`, or an order such as `system/summary/history/pinned/new`),
kv_mode [kv] (`exact` or `shift`), shift_min_tokens, oversize (`error` or `truncate`),
summarize (`on`/`off`), summary_max_tokens, summary_role, summary_prefix, summary_prompt, sink_tokens.
Later pairs override earlier ones. Unknown keys and bad values are refused with a one-line message.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..layout import REGIONS, ContextConfig, Layout

ALIASES = {"reserve": "reply_reserve", "high": "high_watermark", "low": "low_watermark", "kv": "kv_mode"}
LAYOUTS = {"default": REGIONS, "pinned-last": ("system", "summary", "history", "pinned", "new")}
_INT = ("reply_reserve", "shift_min_tokens", "summary_max_tokens", "sink_tokens")
_FLOAT = ("high_watermark", "low_watermark")
_STR = ("kv_mode", "oversize", "summary_role", "summary_prefix", "summary_prompt")
KEYS = (*_INT, *_FLOAT, *_STR, "layout", "summarize")


class PolicyError(ValueError):
    pass


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise PolicyError(f"policy {key} must be on or off, got {value!r}")


def _layout(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    text = str(value).strip()
    if text in LAYOUTS:
        return LAYOUTS[text]
    return tuple(p.strip() for p in text.replace(",", "/").split("/") if p.strip())


def normalize(pairs: dict[str, Any]) -> dict[str, Any]:
    """Canonical policy values (aliases resolved, types converted), in KEYS order."""
    out: dict[str, Any] = {}
    for raw_key, value in pairs.items():
        key = ALIASES.get(raw_key.strip(), raw_key.strip())
        try:
            if key in _INT:
                if isinstance(value, bool):
                    raise ValueError
                out[key] = int(value)
            elif key in _FLOAT:
                out[key] = float(value)
            elif key in _STR:
                out[key] = str(value)
            elif key == "layout":
                out[key] = list(_layout(value))
            elif key == "summarize":
                out[key] = _bool(key, value)
            else:
                raise PolicyError(f"unknown policy key {raw_key!r}; use one of {', '.join(KEYS)}")
        except (TypeError, ValueError) as exc:
            if isinstance(exc, PolicyError):
                raise
            kind = "an integer" if key in _INT else "a number"
            raise PolicyError(f"policy {key} must be {kind}, got {value!r}") from None
    return {k: out[k] for k in KEYS if k in out}


def parse_policy(specs: Sequence[str]) -> dict[str, Any]:
    """`key=value[,key=value...]` strings (or `@file.json`) into one canonical dict."""
    pairs: dict[str, Any] = {}
    for spec in specs:
        spec = spec.strip()
        if spec.startswith("@"):
            try:
                data = json.loads(Path(spec[1:]).read_text(encoding="utf-8"))
            except OSError as exc:
                raise PolicyError(f"cannot read policy file {spec[1:]}: {exc.strerror}") from None
            except ValueError as exc:
                raise PolicyError(f"policy file {spec[1:]} is not valid JSON ({exc})") from None
            if not isinstance(data, dict):
                raise PolicyError(f"policy file {spec[1:]} must hold a JSON object")
            pairs.update(data)
            continue
        # split on commas that start a new key=value pair (layout values may use commas too)
        parts: list[str] = []
        for piece in spec.split(","):
            if "=" in piece or not parts:
                parts.append(piece)
            else:
                parts[-1] += "," + piece
        for part in parts:
            if not part.strip():
                continue
            if "=" not in part:
                raise PolicyError(f"policy {part!r} is not key=value (e.g. high=0.8,low=0.5)")
            k, v = part.split("=", 1)
            pairs[k.strip()] = v.strip()
    return normalize(pairs)


def context_config(policy: dict[str, Any], window: int | None = None,
                   reply_reserve: int | None = None) -> ContextConfig:
    """The ContextConfig a policy describes (the context package checks the values). `reply_reserve`:
    the reserve when the policy sets none (replay uses the reply length limit, max_new_tokens)."""
    values = dict(normalize(policy))
    if reply_reserve is not None:
        values.setdefault("reply_reserve", reply_reserve)
    try:
        if "layout" in values:
            values["layout"] = Layout(tuple(values["layout"]))
        return dataclasses.replace(ContextConfig(), window=window, **values)
    except ValueError as exc:
        raise PolicyError(f"policy: {exc}") from None
