"""Replay plans with the demo model's tokenizer only (mode "plan", no weights): hand-checked pruning,
the CLI on malformed input, the committed plan golden file, and the plugin as users enable it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _replay_data import DATA

from context import TokenBudget
from context.replay import UnknownConversation, main, replay
from context.replay.report import read_report, records, write_report

SYSTEM = "Count with me."


def counting(n: int, pin_first: bool = False) -> dict[str, Any]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    for k in range(1, n + 1):
        msgs.append({"role": "user", "content": f"Count: what number comes after {k}?"})
        if pin_first and k == 1:
            msgs[-1]["pinned"] = True
        msgs.append({"role": "assistant", "content": f"{k + 1}."})
    return {"id": "count", "messages": msgs}


def test_template_counts_behind_the_hand_checked_plans(replay_tokenizer: tuple[Any, int]) -> None:
    """The premises of the hand computation below: the system prompt renders in 9 tokens, each user
    message in 14, each reply in 8 (a turn: 22), the generation prompt in 4."""
    b = TokenBudget(replay_tokenizer[0])
    assert b.additive and len(b.generation_prompt) == 4
    assert len(b.first({"role": "system", "content": SYSTEM})) == 9
    for k in range(1, 9):
        assert b.count({"role": "user", "content": f"Count: what number comes after {k}?"}) == 14
        assert b.count({"role": "assistant", "content": f"{k + 1}."}) == 8


# Window 128, reserve 32: budget 96, high watermark int(0.9 * 96) = 86, low int(0.6 * 96) = 57.
# Fixed part: system 9 + new user message 14 + generation prompt 4 = 27; each kept turn adds 22.
# Keep the cut while 27 + 22 * kept <= 86 (kept <= 2); past it, prune to 27 + 22 * kept <= 57 (kept = 1).
EXPECTED = [  # (turn, kept, dropped, prompt tokens)
    (1, [], [], 27),
    (2, [1], [], 49),
    (3, [1, 2], [], 71),
    (4, [3], [1, 2], 49),        # 27 + 66 = 93 > 86: prune down to one turn
    (5, [3, 4], [1, 2], 71),     # hysteresis: the cut stays
    (6, [5], [1, 2, 3, 4], 49),
    (7, [5, 6], [1, 2, 3, 4], 71),
    (8, [7], [1, 2, 3, 4, 5, 6], 49),
]
# The same with turn 1's user message pinned: fixed 27 + 14 pinned = 41; turn 1 then frees only its
# reply (8). Turn 4: 41 + 8 + 22 + 22 = 93 > 86 -> prune until 41 + rest <= 57: no whole turn fits (22 > 16),
# so all history goes and the pinned message stays in the pinned region.
EXPECTED_PINNED = [  # (turn, kept, dropped, pinned, prompt tokens)
    (1, [], [], [], 27),
    (2, [1], [], [], 49),
    (3, [1, 2], [], [], 71),
    (4, [], [1, 2, 3], [1], 41),
    (5, [4], [1, 2, 3], [1], 63),
    (6, [4, 5], [1, 2, 3], [1], 85),
    (7, [], [1, 2, 3, 4, 5, 6], [1], 41),
    (8, [7], [1, 2, 3, 4, 5, 6], [1], 63),
]


def _plan(replay_tokenizer: tuple[Any, int], rec: dict[str, Any]) -> Any:
    tok, window = replay_tokenizer
    return replay(rec, tokenizer=tok, engine_window=window, mode="plan", window=128, policy={"reserve": 32})


def test_forced_plans_match_hand_checked_expectation(replay_tokenizer: tuple[Any, int]) -> None:
    run = _plan(replay_tokenizer, counting(8))
    got = [(t.turn, list(t.kept), list(t.dropped), t.tokens) for t in run.turns]
    assert got == EXPECTED
    assert all(t.budget == 96 and t.window == 128 and not t.pinned for t in run.turns)
    assert [t.pruned_now for t in run.turns] == [0, 0, 0, 2, 0, 2, 0, 2]
    # The slot holds the last prompt and its reply (the previous prompt minus the generation prompt,
    # plus the 8-token reply), all reused while nothing is pruned. After a prune the shared prefix is
    # the system prompt (9) and the start of the next user message up to its number (10 tokens).
    assert [t.cache_hit_tokens for t in run.turns] == [0, 31, 53, 19, 53, 19, 53, 19]


def test_forced_plans_with_a_pinned_message(replay_tokenizer: tuple[Any, int]) -> None:
    run = _plan(replay_tokenizer, counting(8, pin_first=True))
    got = [(t.turn, list(t.kept), list(t.dropped), list(t.pinned), t.tokens) for t in run.turns]
    assert got == EXPECTED_PINNED
    t4 = run.turns[3]
    assert t4.regions == {"system": 9, "pinned": 14, "summary": 0, "history": 0, "new": 18}
    assert t4.in_context(1) and not t4.in_context(2)
    assert [m["content"] for m in t4.prompt_messages] == [
        SYSTEM, "Count: what number comes after 1?", "Count: what number comes after 4?"]


def test_plan_reports_are_byte_identical(replay_tokenizer: tuple[Any, int], tmp_path: Path) -> None:
    tok, window = replay_tokenizer
    for name in ("a", "b"):
        run = replay(DATA / "conversations.jsonl", tokenizer=tok, engine_window=window, mode="plan", window=256,
                     max_new_tokens=16, policy={"kv": "shift"})
        write_report(tmp_path / f"{name}.jsonl", run.records, timing=False)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_plan_golden(replay: Any) -> None:
    """The committed plan golden file (what the context manager shows the model each turn, at window 256)."""
    run = replay(DATA / "conversations.jsonl", mode="plan", window=256, max_new_tokens=16,
                 golden=DATA / "golden_plans.jsonl")
    assert sum(len(t.dropped) > 0 for t in run.turns) >= 20  # pruning happened
    assert {t.mode for t in run.turns} == {"plan"}


def test_cli_malformed_lines_reported_others_replayed(demo_gguf: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    lines = (DATA / "conversations.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    src = tmp_path / "mixed.jsonl"
    src.write_text("\n".join([lines[0], '{"messages": [{"role": "user", "content": "x"}', lines[1],
                              '{"conversations": [{"from": "wizard", "value": "hi"}]}', lines[2]]) + "\n")
    out = tmp_path / "report.jsonl"
    rc = main([str(src), "--model", str(demo_gguf), "--plan-only", "--window", "256", "-n", "16",
               "--report", str(out), "-q"])
    cap = capsys.readouterr()
    assert rc == 1
    assert f"chatcore replay: error: {src}:2: not valid JSON" in cap.err
    assert f"chatcore replay: error: {src}:4: turn 1 comes 'from' 'wizard'" in cap.err
    recs = read_report(out)
    assert [r["type"] for r in recs[:1]] == ["replay"]
    assert [(r["line"], r["type"]) for r in recs[1:] if r["type"] == "error"] == [(2, "error"), (4, "error")]
    assert sorted({r["conversation"] for r in recs if r["type"] == "turn"}) == ["capitals", "greeting",
                                                                                 "sharegpt-math"]
    assert "2 failed" in cap.out and "greeting" in cap.out


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "none.jsonl"), "--plan-only"]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
    assert main([str(DATA / "conversations.jsonl"), "--policy", "colour=red"]) == 2
    assert "unknown policy key 'colour'" in capsys.readouterr().err
    assert main([str(DATA / "conversations.jsonl"), "--golden", str(tmp_path / "g.jsonl")]) == 2
    assert "create it with --update-golden" in capsys.readouterr().err


def test_cli_unknown_conversation_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = DATA / "conversations.jsonl"
    assert main([str(src), "--plan-only", "--conversation", "nosuch", "-c", "greeting"]) == 1
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1
    assert cap.err.startswith(f"chatcore replay: error: no conversation 'nosuch' in {src}; its conversations: ")
    assert "greeting" in cap.err and "in all)" in cap.err   # 22 conversations: the first 8 named, and the count
    two = tmp_path / "two.jsonl"
    two.write_text(json.dumps(counting(1)) + "\n" + json.dumps({**counting(1), "id": "other"}) + "\n")
    with pytest.raises(UnknownConversation, match=r"no conversation 'a', 'b' in the input; its conversations: "
                                                  r"count, other$"):
        replay(two.read_text(), mode="plan", only=["a", "count", "b"])


def test_cli_bad_device_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(DATA / "conversations.jsonl"), "--device", "tpu", "-q"]) == 2
    err = capsys.readouterr().err
    assert err == "chatcore replay: error: unknown device 'tpu'; use cpu, cuda or cuda:N\n"
    for threads in ("0", "-1"):   # 0 was torch's default, -1 a RuntimeError traceback
        assert main([str(DATA / "conversations.jsonl"), "--threads", threads, "-q"]) == 2
        assert capsys.readouterr().err == (f"chatcore replay: error: --threads must be at least 1, got {threads} "
                                           "(leave it out for torch's default)\n")


def test_cli_window_above_the_models_is_cut_with_a_notice(demo_gguf: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(DATA / "conversations.jsonl"), "--model", str(demo_gguf), "--plan-only", "-c", "greeting",
                 "--window", "99999", "-q"]) == 0
    cap = capsys.readouterr()
    assert cap.err == "chatcore replay: --window 99999 is above the model's window of 8192 tokens; using 8192\n"
    assert "/8192" in cap.out


def test_cli_golden_update_then_mismatch(demo_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps(counting(8)) + "\n")
    golden = tmp_path / "g.jsonl"
    args = [str(src), "--model", str(demo_gguf), "--plan-only", "--window", "128", "-n", "32", "-q",
            "--golden", str(golden)]
    assert main([*args, "--update-golden"]) == 0
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args[:5], "160", *args[6:]]) == 1  # a wider window keeps more turns
    out = capsys.readouterr().out
    assert "  window: 128 -> 160" in out
    assert "conversation count turn 4 (step 4):" in out and "plan.kept: [3] -> [1, 2, 3]" in out
    assert "golden mismatch:" in out


def test_records_in_file_order() -> None:
    from context.replay.formats import InputError
    from context.replay.runner import ConversationResult

    recs = records({"type": "replay"}, [ConversationResult("a", 1, ()), ConversationResult("c", 3, (), "boom")],
                   [InputError("f", 2, "bad")])
    assert [(r["type"], r.get("line")) for r in recs] == [("replay", None), ("error", 2), ("error", 3)]


def test_plugin_as_users_enable_it(demo_gguf: Path, tmp_path: Path) -> None:
    """`pytest_plugins = ["context.replay.pytest_plugin"]` in a project's conftest, and a test in a few lines."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["context.replay.pytest_plugin"]\n')
    (tmp_path / "test_user.py").write_text(
        "def test_fact_kept(replay):\n"
        f"    run = replay({str(DATA / 'conversations.jsonl')!r}, only=['long-pinned-fact'], mode='plan',"
        " window=256)\n"
        "    last = run.conversation().turn(-1)\n"
        "    assert last.dropped and last.in_context(1)\n")
    env = {**os.environ, "CHATCORE_REPLAY_MODEL": str(demo_gguf)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_shift_policy_reuses_the_kept_turns(replay_tokenizer: tuple[Any, int]) -> None:
    """kv=shift: after a prune, the kept turns' cached tokens move back instead of being re-prefilled.

    Turn 4 at window 128 prunes turns 1-2. Exact mode keeps the common prefix: the system prompt (9) and
    the 10 header tokens turn 1 and turn 3 share ("user ... after"), 19 in all. Shift mode restarts at
    the message boundary after the system prompt and moves turn 3 with its reply (22 tokens) back:
    9 + 22 = 31 reused, 12 more than exact; it applies when that gain reaches shift_min_tokens.
    """
    tok, window = replay_tokenizer
    exact = _plan(replay_tokenizer, counting(8))
    assert exact.turns[3].cache_hit_tokens == 19 and exact.turns[4].cache_hit_tokens == 53
    for min_tokens, expected in ((16, 19), (8, 31)):
        shift = replay(counting(8), tokenizer=tok, engine_window=window, mode="plan", window=128,
                       policy={"reserve": 32, "kv": "shift", "shift_min_tokens": min_tokens})
        assert [t.prompt_sha256 for t in shift.turns] == [t.prompt_sha256 for t in exact.turns]  # same prompts
        assert shift.turns[3].cache_hit_tokens == expected
        assert all(s.cache_hit_tokens >= e.cache_hit_tokens for s, e in zip(shift.turns, exact.turns, strict=True))


def test_summarize_needs_the_model(replay_tokenizer: tuple[Any, int]) -> None:
    tok, window = replay_tokenizer
    with pytest.raises(ValueError, match="summarize policy needs the model"):
        replay(counting(2), tokenizer=tok, engine_window=window, mode="plan", window=128,
               policy={"reserve": 32, "summarize": "on"})


def test_cli_bad_text_deep_values_and_a_bom_reported_the_rest_replayed(demo_gguf: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    lines = (DATA / "conversations.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    src = tmp_path / "hostile.jsonl"
    src.write_bytes(b"\n".join([
        b"\xef\xbb\xbf" + lines[0].encode(),
        b'{"id": "s", "messages": [{"role": "user", "content": "hi \\ud83d there"}]}',
        lines[1].encode(),
        b'{"id": "d", "messages": [{"role": "user", "content": "x", "name": ' + b"[" * 100_000 + b"]" * 100_000
        + b"}]}",
        lines[2].encode()]) + b"\n")
    out = tmp_path / "report.jsonl"
    rc = main([str(src), "--model", str(demo_gguf), "--plan-only", "--window", "256", "-n", "16",
               "--report", str(out), "-q"])
    cap = capsys.readouterr()
    assert rc == 1 and "Traceback" not in cap.err
    assert f"chatcore replay: error: {src}:2: a string holds a lone surrogate (\\ud83d at character 4)" in cap.err
    assert f"chatcore replay: error: {src}:4: nested more than 64 deep" in cap.err
    recs = read_report(out)
    assert [(r["line"], r["type"]) for r in recs[1:] if r["type"] == "error"] == [(2, "error"), (4, "error")]
    assert sorted({r["conversation"] for r in recs if r["type"] == "turn"}) == ["capitals", "greeting",
                                                                                 "sharegpt-math"]


class _Refusing:
    """The demo tokenizer, with a chat template that refuses one message (as templates raise_exception)."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def apply_chat_template(self, messages: Any, **kw: Any) -> list[int]:
        from chatcore.tokenizer.chat_template import ChatTemplateError

        if any(m.get("content") == "refuse me" for m in messages):
            raise ChatTemplateError("chat template: roles must alternate")
        return self._tok.apply_chat_template(messages, **kw)


def test_a_template_error_stops_only_its_conversation(replay_tokenizer: tuple[Any, int]) -> None:
    tok, window = replay_tokenizer
    bad = {"id": "bad", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                     {"role": "user", "content": "refuse me"}]}
    run = replay([bad, counting(2)], tokenizer=_Refusing(tok), engine_window=window, mode="plan", window=256,
                 policy={"reserve": 32})
    first, second = run.results
    assert first.error == "turn 2: chat template: roles must alternate" and len(first.turns) == 1
    assert second.error is None and len(second.turns) == 2
