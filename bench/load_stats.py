"""Pure helpers of the load benchmarks (``batch.py``, ``serve_load.py``): percentiles, per-stream token traces
and what they add up to, the roofline of a batched decode step, and the JSON shapes both scripts write.

No torch and no model here: ``tests/test_bench_helpers.py`` checks these on plain numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linear between the two nearest ranks (numpy's default);
    NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / p99, mean, min and max of ``values`` (all NaN for none) and their count."""
    vals = list(values)
    if not vals:
        return {"n": 0, "p50": math.nan, "p95": math.nan, "p99": math.nan, "mean": math.nan, "min": math.nan,
                "max": math.nan}
    return {"n": len(vals), "p50": percentile(vals, 50), "p95": percentile(vals, 95), "p99": percentile(vals, 99),
            "mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}


@dataclass
class Trace:
    """One stream of one measured round: when its request was submitted and when each of its tokens arrived
    (seconds on one clock, ``time.perf_counter``)."""

    submit: float
    tokens: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.tokens[0] - self.submit

    @property
    def decode_rate(self) -> float:
        """Tokens/s after its first token: (n - 1) over the time from its first to its last token."""
        span = self.tokens[-1] - self.tokens[0] if self.tokens else 0.0
        return (len(self.tokens) - 1) / span if len(self.tokens) > 1 and span > 0 else 0.0


def aggregate(traces: Sequence[Trace], expected_tokens: int) -> dict[str, Any]:
    """What one round of concurrent streams adds up to.

    - ``tokens_per_s``: every token of the round over the time from the first submit to the last token
      (prefill and queueing included);
    - ``decode_tokens_per_s``: the steady decode rate: tokens that arrived while every stream was decoding
      (after the last stream's first token, up to the first stream's last token) over that window; when the
      window holds fewer than two steps' worth (a stream finished before another started), it is
      ``decode_tokens_per_s_overall`` instead: every stream's tokens after its first over the time from the first
      first-token to the last token;
    - per stream: decode tokens/s (p50 and min) and time to first token (p50 / p95 / max);
    - ``complete``: every stream without error and with exactly ``expected_tokens`` tokens.
    """
    ok = [t for t in traces if t.error is None and t.tokens]
    out: dict[str, Any] = {"streams": len(traces), "errors": sum(t.error is not None for t in traces),
                           "complete": len(ok) == len(traces) and all(len(t.tokens) == expected_tokens for t in ok),
                           "tokens": sum(len(t.tokens) for t in ok)}
    if not ok:
        return out
    start = min(t.submit for t in ok)
    first = [t.tokens[0] for t in ok]
    last = [t.tokens[-1] for t in ok]
    out["wall_s"] = max(last) - start
    out["tokens_per_s"] = out["tokens"] / out["wall_s"] if out["wall_s"] > 0 else 0.0
    overall_span = max(last) - min(first)
    overall_tokens = sum(len(t.tokens) - 1 for t in ok)
    out["decode_tokens_per_s_overall"] = overall_tokens / overall_span if overall_span > 0 else 0.0
    w0, w1 = max(first), min(last)
    in_window = sum(1 for t in ok for x in t.tokens if w0 < x <= w1)
    out["decode_window"] = {"start_s": w0 - start, "end_s": w1 - start, "tokens": in_window}
    if w1 > w0 and in_window >= 2 * len(ok):
        out["decode_tokens_per_s"] = in_window / (w1 - w0)
    else:
        out["decode_tokens_per_s"] = out["decode_tokens_per_s_overall"]
    rates = [t.decode_rate for t in ok]
    out["per_stream_decode_tokens_per_s"] = {"p50": percentile(rates, 50), "min": min(rates)}
    ttft = summary([t.ttft for t in ok])
    out["ttft_s"] = {"p50": ttft["p50"], "p95": ttft["p95"], "max": ttft["max"]}
    return out


@dataclass(frozen=True)
class StepCost:
    """What one decode step of a model reads and computes per sequence, for its roofline."""

    weight_bytes: int           # every weight a step multiplies by (the embedding table only when tied)
    kv_bytes_per_token: int     # K and V of one cached token, all layers
    flops_per_token: float      # 2 x the multiplied weights' elements (matmuls only)
    attn_flops_per_key: float   # 4 x layers x query heads x head_dim: the scores and values of one cached key

    def __post_init__(self) -> None:
        if min(self.weight_bytes, self.kv_bytes_per_token) <= 0 or min(self.flops_per_token,
                                                                        self.attn_flops_per_key) <= 0:
            raise ValueError(f"a step cost must be positive: {self}")


def roofline(cost: StepCost, streams: int, context: float, bandwidth: float,
             peak_flops: float | None = None) -> dict[str, float]:
    """Aggregate tokens/s a batched decode step of ``streams`` sequences, each ``context`` keys long, cannot
    beat: one step reads the weights once plus every sequence's live KV (``bytes_per_step``) at ``bandwidth``
    bytes/s; with ``peak_flops``, it also cannot compute faster than that (``compute_tokens_per_s``).
    ``tokens_per_s`` is the lower of the two."""
    if streams < 1 or context < 0 or bandwidth <= 0:
        raise ValueError(f"bad roofline arguments: streams={streams} context={context} bandwidth={bandwidth}")
    step_bytes = cost.weight_bytes + streams * cost.kv_bytes_per_token * context
    memory = streams * bandwidth / step_bytes
    out = {"bytes_per_step": step_bytes, "memory_tokens_per_s": memory, "tokens_per_s": memory}
    if peak_flops:
        compute = peak_flops / (cost.flops_per_token + cost.attn_flops_per_key * context)
        out["compute_tokens_per_s"] = compute
        out["tokens_per_s"] = min(memory, compute)
    return out


def step_cost(*, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
              vocab: int, tied: bool, bytes_per_weight: int, bytes_per_kv: int) -> StepCost:
    """:class:`StepCost` of a Llama-shaped model (q/k/v/o, gated MLP, head; norms ignored)."""
    per_layer = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * intermediate
    multiplied = layers * per_layer + vocab * hidden   # the head (the embedding itself is a lookup)
    return StepCost(weight_bytes=multiplied * bytes_per_weight,
                    kv_bytes_per_token=2 * layers * kv_heads * head_dim * bytes_per_kv,
                    flops_per_token=2.0 * multiplied, attn_flops_per_key=4.0 * layers * heads * head_dim)


# -- JSON shapes ---------------------------------------------------------------------------------------------------
RUN_KEYS = ("streams", "errors", "complete", "tokens", "wall_s", "tokens_per_s", "decode_tokens_per_s",
            "per_stream_decode_tokens_per_s", "ttft_s")


def check_batch_json(results: dict[str, Any]) -> list[str]:
    """Problems with a ``batch.json`` (empty: none): its top-level keys, and for every measured stream count
    each engine's run keys and the roofline."""
    problems = [f"missing {k}" for k in ("device", "args", "bandwidth_gbs", "models") if k not in results]
    for name, m in results.get("models", {}).items():
        for k in ("weight_bytes", "kv_bytes_per_token", "streams"):
            if k not in m:
                problems.append(f"{name}: missing {k}")
        for n, row in m.get("streams", {}).items():
            if "roofline" not in row:
                problems.append(f"{name} x{n}: missing roofline")
            for engine in ("chatcore", "transformers"):
                run = row.get(engine)
                if run is None or "skipped" in run or "error" in run:
                    continue
                problems += [f"{name} x{n} {engine}: missing {k}" for k in RUN_KEYS if k not in run]
                if run.get("streams") != int(n):
                    problems.append(f"{name} x{n} {engine}: {run.get('streams')} streams")
    return problems


SERVE_KEYS = ("clients", "turns", "requests", "errors", "ttft_s", "reply_s", "conversations_complete")


def check_serve_json(results: dict[str, Any]) -> list[str]:
    """Problems with a ``serve_load.json`` (empty: none)."""
    problems = [f"missing {k}" for k in ("device", "args", "runs") if k not in results]
    for i, run in enumerate(results.get("runs", [])):
        problems += [f"run {i}: missing {k}" for k in SERVE_KEYS if k not in run]
        for k in ("ttft_s", "reply_s"):
            if k in run and not {"p50", "p95", "p99"} <= set(run[k]):
                problems.append(f"run {i}: {k} lacks p50/p95/p99")
    return problems
