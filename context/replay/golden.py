"""Compare a replay report with a golden one: a readable per-turn diff (timing fields excluded).

Records are matched by (conversation, step); error records by (conversation or line). For each turn
that differs, every differing field is listed (`plan.kept: [1, 2, 3] -> [2, 3]`), and replies are
shown in full, golden first. Scores (`score.nll`, `score.top1`) are compared within SCORE_TOLERANCE,
everything else exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import TIMING, read_report, without_timing, write_report

SCORE_TOLERANCE = 1e-3
Key = tuple[str, Any]


def _key(rec: dict[str, Any]) -> Key:
    if rec.get("type") == "replay":
        return ("header", None)
    name = rec.get("conversation") or f"line{rec.get('line')}"
    if rec.get("type") == "error":
        return (name, "error")
    return (name, rec.get("step"))


def _label(key: Key, rec: dict[str, Any]) -> str:
    name, what = key
    if name == "header":
        return "settings"
    if what == "error":
        return f"conversation {name} (line {rec.get('line')}): error"
    return f"conversation {name} turn {rec.get('turn')} (step {what})"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k == TIMING and not prefix:
                continue
            if isinstance(v, dict) and k != "regions" and k != "policy":
                out.update(_flatten(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    return {prefix.rstrip("."): value}


def _same(path: str, a: Any, b: Any) -> bool:
    if path.startswith("score.") and isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= SCORE_TOLERANCE
    return a == b


def _show(path: str, v: Any) -> str:
    if path == "prompt_sha256" and isinstance(v, str):
        return v[:12] + "…"
    return repr(v) if isinstance(v, str) else str(v)


def diff_record(golden: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Lines describing how `now` differs from `golden` (empty when they match)."""
    g, n = _flatten(golden), _flatten(now)
    lines: list[str] = []
    for path in [*g, *(p for p in n if p not in g)]:
        a, b = g.get(path), n.get(path)
        if _same(path, a, b):
            continue
        if path in ("reply", "summary", "error") and (isinstance(a, str) or isinstance(b, str)):
            lines += [f"  {path}:", f"    - golden: {_show(path, a)}", f"    + now:    {_show(path, b)}"]
        elif isinstance(a, list) and isinstance(b, list) and path.startswith("plan."):
            gone, new = [x for x in a if x not in b], [x for x in b if x not in a]
            detail = ", ".join(p for p in (f"no longer {gone}" if gone else "", f"now also {new}" if new else "")
                               if p)
            lines.append(f"  {path}: {a} -> {b}" + (f"  ({detail})" if detail else ""))
        else:
            lines.append(f"  {path}: {_show(path, a)} -> {_show(path, b)}")
    return lines


def compare(now: Sequence[dict[str, Any]], golden: Sequence[dict[str, Any]]) -> list[str]:
    """A readable diff of two reports, per turn; empty when they match (timing ignored)."""
    g = {_key(r): without_timing(r) for r in golden}
    n = {_key(r): without_timing(r) for r in now}
    out: list[str] = []
    changed = missing = new = 0
    for key in [*g, *(k for k in n if k not in g)]:
        if key not in n:
            missing += 1
            out.append(f"{_label(key, g[key])}: in the golden file, not in this replay")
        elif key not in g:
            new += 1
            out.append(f"{_label(key, n[key])}: new in this replay (not in the golden file)")
        else:
            lines = diff_record(g[key], n[key])
            if lines:
                changed += 1
                out += [f"{_label(key, n[key])}:", *lines]
    if out:
        parts = [f"{changed} record(s) differ" if changed else "", f"{missing} missing" if missing else "",
                 f"{new} new" if new else ""]
        out.append("golden mismatch: " + ", ".join(p for p in parts if p))
    return out


def check(now: Sequence[dict[str, Any]], path: str | Path) -> list[str]:
    """compare() against the golden report at `path` (FileNotFoundError if there is none)."""
    return compare(now, read_report(path))


def update(now: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write `now` as the golden report (timing left out, so the file is byte-stable)."""
    write_report(path, now, timing=False)
