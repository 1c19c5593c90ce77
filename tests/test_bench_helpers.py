"""The load benchmarks' pure helpers (bench/load_stats.py, serve_load.py's storage check): counted, no model."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _module(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


ls = _module("load_stats")


def test_percentiles_interpolate_between_ranks() -> None:
    assert ls.percentile([4, 1, 3, 2], 50) == 2.5
    assert ls.percentile([1, 2, 3, 4], 95) == pytest.approx(3.85)
    assert ls.percentile([1, 2, 3, 4], 0) == 1 and ls.percentile([1, 2, 3, 4], 100) == 4
    assert ls.percentile([7], 99) == 7
    assert math.isnan(ls.percentile([], 50))
    with pytest.raises(ValueError):
        ls.percentile([1], 101)
    s = ls.summary(list(range(101)))
    assert (s["n"], s["p50"], s["p95"], s["p99"], s["min"], s["max"], s["mean"]) == (101, 50, 95, 99, 0, 100, 50)
    assert ls.summary([])["n"] == 0


def test_aggregate_counts_the_steady_decode_window() -> None:
    # stream a: submitted at 0, tokens at 1..10; stream b: submitted at 0, tokens at 3..12 (one per second each)
    a = ls.Trace(submit=0.0, tokens=[float(t) for t in range(1, 11)])
    b = ls.Trace(submit=0.0, tokens=[float(t) for t in range(3, 13)])
    res = ls.aggregate([a, b], expected_tokens=10)
    assert res["complete"] and res["errors"] == 0 and res["tokens"] == 20
    assert res["wall_s"] == 12 and res["tokens_per_s"] == pytest.approx(20 / 12)
    # both decode from t=3 to t=10: a's tokens 4..10 and b's 4..10 arrive in (3, 10]: 14 tokens in 7 s
    assert res["decode_window"] == {"start_s": 3.0, "end_s": 10.0, "tokens": 14}
    assert res["decode_tokens_per_s"] == 2.0
    assert res["decode_tokens_per_s_overall"] == pytest.approx(18 / 11)
    assert res["per_stream_decode_tokens_per_s"] == {"p50": 1.0, "min": 1.0}
    assert res["ttft_s"] == {"p50": 2.0, "p95": pytest.approx(2.9), "max": 3.0}


def test_aggregate_without_overlap_uses_the_overall_rate_and_flags_failures() -> None:
    a = ls.Trace(submit=0.0, tokens=[1.0, 2.0, 3.0])
    b = ls.Trace(submit=0.0, tokens=[5.0, 6.0, 7.0])            # starts after a ended: no common window
    res = ls.aggregate([a, b], expected_tokens=3)
    assert res["decode_tokens_per_s"] == res["decode_tokens_per_s_overall"] == pytest.approx(4 / 6)
    short = ls.aggregate([a, ls.Trace(submit=0.0, tokens=[1.0, 2.0])], expected_tokens=3)
    assert not short["complete"]
    failed = ls.aggregate([a, ls.Trace(submit=0.0, error="boom")], expected_tokens=3)
    assert failed["errors"] == 1 and not failed["complete"] and failed["tokens"] == 3
    assert ls.aggregate([ls.Trace(submit=0.0, error="x")], 3) == {"streams": 1, "errors": 1, "complete": False,
                                                                  "tokens": 0}


def test_roofline_reads_weights_once_and_each_streams_kv() -> None:
    cost = ls.StepCost(weight_bytes=100, kv_bytes_per_token=1, flops_per_token=10.0, attn_flops_per_key=1.0)
    r = ls.roofline(cost, streams=4, context=10, bandwidth=1000.0)
    assert r["bytes_per_step"] == 140 and r["tokens_per_s"] == pytest.approx(4000 / 140)
    assert "compute_tokens_per_s" not in r
    c = ls.roofline(cost, streams=4, context=10, bandwidth=1000.0, peak_flops=100.0)
    assert c["compute_tokens_per_s"] == 100 / 20 and c["tokens_per_s"] == 5.0   # compute bound here
    assert ls.roofline(cost, 1, 10, 1000.0)["tokens_per_s"] == pytest.approx(1000 / 110)
    with pytest.raises(ValueError):
        ls.roofline(cost, 0, 10, 1000.0)
    with pytest.raises(ValueError):
        ls.StepCost(weight_bytes=0, kv_bytes_per_token=1, flops_per_token=1.0, attn_flops_per_key=1.0)


def test_step_cost_of_the_8b_shape() -> None:
    cost = ls.step_cost(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
                        vocab=128256, tied=False, bytes_per_weight=2, bytes_per_kv=2)
    # Llama-3.1-8B: 8,030,261,248 parameters = these 7,504,658,432 + the embedding table + the norms
    assert cost.weight_bytes == 2 * 7_504_658_432
    assert 7_504_658_432 + 128256 * 4096 + (2 * 32 + 1) * 4096 == 8_030_261_248
    assert cost.kv_bytes_per_token == 131072
    assert cost.flops_per_token == 2 * 7_504_658_432 and cost.attn_flops_per_key == 4 * 32 * 32 * 128


def _batch_doc() -> dict[str, Any]:
    run = {k: 0 for k in ls.RUN_KEYS} | {"streams": 4}
    return {"device": "cpu", "args": {}, "bandwidth_gbs": 1.0,
            "models": {"tiny": {"weight_bytes": 1, "kv_bytes_per_token": 1,
                                "streams": {"4": {"roofline": {}, "chatcore": run,
                                                  "transformers": {"skipped": "deadline"}}}}}}


def test_json_checks_name_what_is_missing() -> None:
    doc = _batch_doc()
    assert ls.check_batch_json(doc) == []
    del doc["models"]["tiny"]["streams"]["4"]["chatcore"]["ttft_s"]
    doc["models"]["tiny"]["streams"]["4"]["chatcore"]["streams"] = 3
    assert ls.check_batch_json(doc) == ["tiny x4 chatcore: missing ttft_s", "tiny x4 chatcore: 3 streams"]
    assert ls.check_batch_json({"models": {}}) == ["missing device", "missing args", "missing bandwidth_gbs"]
    pct = {"p50": 1, "p95": 2, "p99": 3}
    serve = {"device": "cpu", "args": {}, "runs": [{k: pct for k in ls.SERVE_KEYS}]}
    assert ls.check_serve_json(serve) == []
    serve["runs"][0]["reply_s"] = {"p50": 1}
    del serve["runs"][0]["errors"]
    assert ls.check_serve_json(serve) == ["run 0: missing errors", "run 0: reply_s lacks p50/p95/p99"]


# -- serve_load's check of a stored conversation, on a store stand-in -------------------------------------------
class _Store:
    def __init__(self, recs: dict[str, Any], thread: list[Any]) -> None:
        self.recs, self._thread = recs, thread

    def get_response(self, rid: str) -> Any:
        return self.recs[rid]

    def thread(self, sid: str) -> list[Any]:
        return self._thread

    def session_responses(self, sid: str) -> list[Any]:
        return list(self.recs.values())


def _conversation(sl: ModuleType, turns: int) -> tuple[Any, _Store]:
    client = sl.Client(0, "responses")
    recs, thread = {}, [SimpleNamespace(id="sys", role="system", content="be brief", status="complete")]
    for k in range(turns):
        client.turns.append(sl.Turn(0, k, "responses", start=0.0, response_id=f"r{k}"))
        recs[f"r{k}"] = SimpleNamespace(id=f"r{k}", session_id="s", status="completed", incomplete_reason=None,
                                        error=None, previous_id=f"r{k - 1}" if k else None, input_ids=(f"u{k}",),
                                        output_id=f"a{k}")
        thread.append(SimpleNamespace(id=f"u{k}", role="user", content=sl.user_message(0, k), status="complete"))
        thread.append(SimpleNamespace(id=f"a{k}", role="assistant", content="ok", status="complete"))
    return client, _Store(recs, thread)


def test_serve_load_finds_every_kind_of_incomplete_conversation() -> None:
    sl = _module("serve_load")
    client, store = _conversation(sl, 3)
    assert sl.conversation_problems(store, client, 3) == []
    assert sl.conversation_problems(store, client, 4) == ["client 0: 3 of 4 turns answered"]

    client, store = _conversation(sl, 3)
    store._thread[4] = SimpleNamespace(id="a1", role="assistant", content="o", status="incomplete")
    assert sl.conversation_problems(store, client, 3) == ["client 0 message 3: reply incomplete, 1 characters"]

    client, store = _conversation(sl, 3)
    store.recs["r2"].status, store.recs["r2"].incomplete_reason = "incomplete", "max_output_tokens"
    assert sl.conversation_problems(store, client, 3) == []          # a reply cut at max_output_tokens is whole
    store.recs["r1"].status = "cancelled"
    store.recs["r2"].previous_id = "r0"
    assert sl.conversation_problems(store, client, 3) == ["client 0 turn 1: response cancelled (None)",
                                                          "client 0 turn 2: previous_response_id r0 is not turn 1's"]

    client, store = _conversation(sl, 3)
    del store._thread[5:]                                             # the last turn's user message and reply lost
    assert sl.conversation_problems(store, client, 3) == [
        "client 0: the session's thread has 4 messages, 6 expected",
        "client 0: the thread's messages are not the ones its responses name, in order"]


# -- the scripts' CPU paths, end to end (slow: a model, threads, a server process) ---------------------------------
@pytest.mark.slow
def test_batch_bench_runs_its_cpu_path(tmp_path: Path) -> None:
    import json
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    subprocess.run([sys.executable, str(BENCH / "batch.py"), "--device", "cpu", "--models", "tiny", "--streams", "1",
                    "4", "--prompt", "16", "--new", "4", "--out", str(tmp_path)], check=True, env=env,
                   capture_output=True, timeout=300)
    res = json.loads((tmp_path / "batch_cpu.json").read_text())
    assert ls.check_batch_json(res) == [] and "schema_problems" not in res
    rows = res["models"]["tiny"]["streams"]
    for n in ("1", "4"):
        for engine in ("chatcore", "transformers"):
            assert rows[n][engine]["complete"] and rows[n][engine]["tokens"] == 4 * int(n)
        assert rows[n]["stream0_identical_to_engine"]
    assert (tmp_path / "batch_cpu.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.redis
def test_serve_load_runs_its_cpu_path(tmp_path: Path) -> None:
    import json
    import os
    import subprocess

    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    subprocess.run([sys.executable, str(BENCH / "serve_load.py"), "--device", "cpu", "--clients", "3", "--turns", "2",
                    "--max-tokens", "4", "--chat-share", "0.34", "--client-procs", "2", "--out", str(tmp_path)],
                   check=True, env=env, capture_output=True, timeout=300)
    run = json.loads((tmp_path / "serve_load_cpu.json").read_text())["runs"][0]
    assert run["errors"] == 0 and run["ok"] == 6 and run["apis"] == {"responses": 2, "chat": 1}
    assert run["conversations"] == run["conversations_complete"] == 2
    # the clients ran in two processes, whose turns came back; both sides' CPU was counted
    assert run["client_procs"] == 2 and run["server_cpu_s"] > 0 and run["client_cpu_s"] > 0
    assert run["server_cpu_ms_per_output_token"] == pytest.approx(run["server_cpu_s"] * 1e3 / run["output_tokens"])
