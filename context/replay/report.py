"""The replay report: JSONL records (a header, one record per turn, one per error), a summary table,
and an optional plot.

Record types, one JSON object per line, keys in a fixed order:
- `{"type": "replay", ...}`: the header (format, schema, model file name, mode, window, policy, seed,
  max_new_tokens, temperature).
- `{"type": "turn", "conversation", "line", "step", "turn", "mode", "user", "plan": {...}, "prompt_sha256",
  "cache_hit_tokens", "prefill_tokens", "reply", "reply_tokens", "finish_reason", "score", "summary",
  "timing": {"ttft_s", "decode_tok_s", "wall_s"}}`.
- `{"type": "error", "conversation", "line", "error"}`: a malformed input line, or a conversation that
  stopped (then after its replayed turns).

Everything outside `timing` is reproducible: the same inputs, model, seed and policy give the same
bytes. `write_report(..., timing=False)` leaves timing out, making whole files byte-identical.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .formats import InputError
from .runner import ConversationResult, TurnResult

FORMAT = "chatcore.replay"
SCHEMA = 1
TIMING = "timing"
_PREVIEW = 80


def preview(text: str, n: int = _PREVIEW) -> str:
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 1] + "…"


def header(model: str, mode: str, window: int | None, policy: dict[str, Any], seed: int, max_new_tokens: int,
           temperature: float) -> dict[str, Any]:
    return {"type": "replay", "format": FORMAT, "schema": SCHEMA, "model": model, "mode": mode, "window": window,
            "policy": dict(policy), "seed": seed, "max_new_tokens": max_new_tokens, "temperature": temperature}


def turn_record(t: TurnResult) -> dict[str, Any]:
    return {
        "type": "turn", "conversation": t.conversation, "line": t.line, "step": t.step, "turn": t.turn,
        "mode": t.mode, "user": preview(t.user),
        "plan": {"window": t.window, "budget": t.budget, "tokens": t.tokens, "regions": dict(t.regions),
                 "kept": list(t.kept), "pinned": list(t.pinned), "summarized": list(t.summarized),
                 "dropped": list(t.dropped), "pruned_now": t.pruned_now, "truncated": t.truncated},
        "prompt_sha256": t.prompt_sha256, "cache_hit_tokens": t.cache_hit_tokens, "prefill_tokens": t.prefill_tokens,
        "reply": t.reply, "reply_tokens": t.reply_tokens, "finish_reason": t.finish_reason, "score": t.score,
        "summary": t.summary,
        TIMING: {"ttft_s": round(t.ttft_s, 4), "decode_tok_s": round(t.decode_tok_s, 2), "wall_s": round(t.wall_s, 4)},
    }


def error_record(conversation: str | None, line: int, message: str) -> dict[str, Any]:
    return {"type": "error", "conversation": conversation, "line": line, "error": message}


def records(head: dict[str, Any], results: Sequence[ConversationResult],
            input_errors: Sequence[InputError] = ()) -> list[dict[str, Any]]:
    """The report: the header, then per input line (in file order) its turns or its error."""
    by_line: list[tuple[int, int, list[dict[str, Any]]]] = []
    for r in results:
        recs = [turn_record(t) for t in r.turns]
        if r.error is not None:
            recs.append(error_record(r.conversation, r.line, r.error))
        by_line.append((r.line, 0, recs))
    for e in input_errors:
        by_line.append((e.line, 1, [error_record(e.conversation, e.line, e.message)]))
    out = [head]
    for _, _, recs in sorted(by_line, key=lambda x: (x[0], x[1])):
        out += recs
    return out


def without_timing(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k != TIMING}


def dumps(rec: dict[str, Any]) -> str:
    return json.dumps(rec, ensure_ascii=False, separators=(", ", ": "))


def write_report(path: str | Path, recs: Iterable[dict[str, Any]], *, timing: bool = True) -> None:
    text = "".join(dumps(r if timing else without_timing(r)) + "\n" for r in recs)
    Path(path).write_text(text, encoding="utf-8")


def read_report(path: str | Path) -> list[dict[str, Any]]:
    """A report written by write_report. Raises ValueError naming the line that is not JSON."""
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc})") from None
    return out


# -- summary table ------------------------------------------------------------------------------------
def summary_rows(recs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per conversation: turns, peak and mean prompt tokens, turns dropped at the end, cache hit rate,
    mean time to first token, mean decode speed, mean score, errors."""
    rows: dict[str, dict[str, Any]] = {}
    for r in recs:
        if r.get("type") not in ("turn", "error"):
            continue
        name = r.get("conversation") or f"line{r['line']}"
        row = rows.setdefault(name, {"conversation": name, "turns": [], "errors": []})
        (row["turns"] if r["type"] == "turn" else row["errors"]).append(r)
    out = []
    for row in rows.values():
        turns = row["turns"]
        n = len(turns)
        prompt = sum(t["plan"]["tokens"] for t in turns)
        hits = sum(t["cache_hit_tokens"] for t in turns)
        ttft = [t.get(TIMING, {}).get("ttft_s", 0.0) for t in turns]
        speed = [t.get(TIMING, {}).get("decode_tok_s", 0.0) for t in turns if t.get("reply_tokens", 0) > 1]
        scores = [t["score"]["nll"] for t in turns if t.get("score")]
        out.append({
            "conversation": row["conversation"], "turns": n,
            "peak_tokens": max((t["plan"]["tokens"] for t in turns), default=0),
            "window": turns[0]["plan"]["window"] if turns else 0,
            "mean_tokens": prompt / n if n else 0.0,
            "dropped": len(turns[-1]["plan"]["dropped"]) if turns else 0,
            "cache_hit": hits / prompt if prompt else 0.0,
            "ttft_ms": 1000 * sum(ttft) / n if n else 0.0,
            "tok_s": sum(speed) / len(speed) if speed else 0.0,
            "nll": sum(scores) / len(scores) if scores else None,
            "error": row["errors"][0]["error"] if row["errors"] else "",
        })
    return out


def summary_table(recs: Sequence[dict[str, Any]]) -> str:
    rows = summary_rows(recs)
    head = ["conversation", "turns", "peak/window", "mean", "dropped", "cache hit", "ttft ms", "tok/s", "nll",
            "status"]
    body = []
    for r in rows:
        body.append([preview(r["conversation"], 28), str(r["turns"]),
                     f"{r['peak_tokens']}/{r['window']}" if r["turns"] else "-",
                     f"{r['mean_tokens']:.0f}", str(r["dropped"]), f"{100 * r['cache_hit']:.0f}%",
                     f"{r['ttft_ms']:.0f}", f"{r['tok_s']:.1f}", "-" if r["nll"] is None else f"{r['nll']:.3f}",
                     preview("error: " + r["error"], 60) if r["error"] else "ok"])
    n = sum(r["turns"] for r in rows)
    failed = sum(1 for r in rows if r["error"])
    hit = sum(r["cache_hit"] * r["mean_tokens"] * r["turns"] for r in rows)
    total = sum(r["mean_tokens"] * r["turns"] for r in rows)
    body.append([f"total ({len(rows)})", str(n), "", f"{total / n:.0f}" if n else "0", "",
                 f"{100 * hit / total:.0f}%" if total else "0%",
                 f"{sum(r['ttft_ms'] * r['turns'] for r in rows) / n:.0f}" if n else "0", "", "",
                 f"{failed} failed" if failed else "ok"])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    left = {0, len(head) - 1}

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                 strict=True)))
    rule = "  ".join("-" * w for w in widths)
    lines = [fmt(head), rule, *(fmt(b) for b in body[:-1]), rule, fmt(body[-1])]
    return "".join(line.rstrip() + "\n" for line in lines)


# -- plot ---------------------------------------------------------------------------------------------
def plot(recs: Sequence[dict[str, Any]], path: str | Path) -> None:
    """A PNG: prompt tokens per turn (with each conversation's window) and time to first token per turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    convs: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        if r.get("type") == "turn":
            convs.setdefault(r["conversation"], []).append(r)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    windows = set()
    for name, turns in convs.items():
        xs = [t["turn"] for t in turns]
        ax1.plot(xs, [t["plan"]["tokens"] for t in turns], marker=".", linewidth=1, label=name)
        ax2.plot(xs, [1000 * t.get(TIMING, {}).get("ttft_s", 0.0) for t in turns], marker=".", linewidth=1)
        windows.add(turns[0]["plan"]["budget"])
    for w in windows:
        ax1.axhline(w, color="grey", linestyle="--", linewidth=0.8)
    ax1.set_ylabel("prompt tokens (dashed: budget)")
    ax2.set_ylabel("time to first token (ms)")
    ax2.set_xlabel("turn")
    ax1.set_title("chatcore replay")
    if 0 < len(convs) <= 12:
        ax1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
