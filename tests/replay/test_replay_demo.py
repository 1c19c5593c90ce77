"""The shipped conversations replayed with the demo model on the CPU: byte-identical reports across
runs, the committed golden report, forced mode with the model, and the CLI end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from _replay_data import DATA
from test_replay_plans import EXPECTED, counting

from context.replay import main, replay
from context.replay.golden import compare, update
from context.replay.report import dumps, read_report, without_timing

pytestmark = pytest.mark.slow
GOLDEN = DATA / "golden.jsonl"
SETTINGS: dict[str, Any] = {"window": 256, "max_new_tokens": 4, "seed": 0}


@pytest.fixture(scope="module")
def two_runs(demo_engine: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [replay(DATA / "conversations.jsonl", demo_engine, **SETTINGS).records for _ in range(2)]
    finally:
        torch.set_num_threads(before)
    return runs[0], runs[1]


def test_generate_twice_byte_identical(two_runs: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    a, b = two_runs
    text = ["".join(dumps(without_timing(r)) + "\n" for r in recs) for recs in (a, b)]
    assert text[0] == text[1]
    turns = [r for r in a if r["type"] == "turn"]
    assert len(turns) >= 100 and not [r for r in a if r["type"] == "error"]
    assert sum(1 for t in turns if t["plan"]["dropped"]) >= 20  # pruning at this window
    assert sum(t["cache_hit_tokens"] for t in turns) > 0.5 * sum(t["plan"]["tokens"] for t in turns)
    assert all(t["reply"] is not None for t in turns if t["mode"] == "generate")
    assert all(t["timing"]["ttft_s"] > 0 for t in turns)
    assert [t["mode"] for t in turns if t["conversation"] == "tool-call"] == ["forced", "generate", "generate"]


def test_golden_report(two_runs: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    """tests/data/replay/golden.jsonl: regenerate with
    `CHATCORE_UPDATE_GOLDEN=1 pytest tests/replay/test_replay_demo.py` (or the CLI with --threads 1 --window 256
    -n 4 --update-golden) after a change that is meant to alter replies or plans."""
    if os.environ.get("CHATCORE_UPDATE_GOLDEN", "") not in ("", "0"):
        update(two_runs[0], GOLDEN)
    diff = compare(two_runs[0], read_report(GOLDEN))
    assert diff == [], "\n".join(diff)


def test_forced_with_model_scores_and_keeps_the_hand_checked_plans(demo_engine: Any) -> None:
    rec = counting(8)
    rec["messages"].append({"role": "user", "content": "Count: what number comes after 9?"})
    forced = replay(rec, demo_engine, mode="forced", window=128, max_new_tokens=32, policy={"reserve": 32})
    planned = replay(rec, tokenizer=demo_engine.tokenizer, engine_window=demo_engine.window, mode="plan",
                     window=128, max_new_tokens=32, policy={"reserve": 32})
    got = [(t.turn, list(t.kept), list(t.dropped), t.tokens) for t in forced.turns[:8]]
    assert got == EXPECTED
    assert [t.prompt_sha256 for t in forced.turns] == [t.prompt_sha256 for t in planned.turns]
    assert [t.cache_hit_tokens for t in forced.turns] == [t.cache_hit_tokens for t in planned.turns]
    assert all(t.mode == "forced" and t.score is not None and t.score["tokens"] == 4 for t in forced.turns[:8])
    assert sum(t.score["top1"] for t in forced.turns[:8]) / 8 >= 0.5  # counting is easy for the model
    last = forced.turns[-1]
    assert last.mode == "generate" and "10" in (last.reply or "")


def test_cli_end_to_end(demo_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "two.jsonl"
    lines = (DATA / "conversations.jsonl").read_text(encoding="utf-8").splitlines()
    src.write_text("\n".join(lines[:2]) + "\n")
    report, plot = tmp_path / "r.jsonl", tmp_path / "p.png"
    rc = main([str(src), "--model", str(demo_gguf), "--device", "cpu", "--forced", "--window", "256", "-n", "8",
               "--report", str(report), "--plot", str(plot), "--policy", "high=0.8,low=0.5"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    recs = [json.loads(x) for x in report.read_text().splitlines()]
    assert recs[0]["mode"] == "forced" and recs[0]["policy"] == {"high_watermark": 0.8, "low_watermark": 0.5}
    assert len(recs) > 1 and all("timing" in r and r["score"] for r in recs[1:])  # turns, each scored
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "conversation" in cap.out and "total (2)" in cap.out
    assert "greeting turn 1:" in cap.err  # progress


def test_summarize_policy(demo_engine: Any) -> None:
    run = replay(counting(5), demo_engine, mode="forced", window=128, max_new_tokens=32,
                 policy={"reserve": 32, "summarize": "on", "summary_max_tokens": 8})
    t4 = run.turns[3]
    assert t4.summary and t4.summarized == (1, 2) and t4.regions["summary"] > 0
    t5 = run.turns[4]  # the summary now takes room too: the cut moves on and the summary is extended
    assert t5.summarized[:2] == (1, 2) and t5.summarized == t5.dropped and t5.regions["summary"] > 0
