"""Replay inputs and outputs without a model: JSONL parsing with line numbers, --policy, golden diffs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _replay_data import DATA

from context.replay.api import as_conversations
from context.replay.formats import load_file, parse_lines
from context.replay.golden import compare
from context.replay.policy import PolicyError, context_config, parse_policy

GOOD_OPENAI = json.dumps({"id": "a", "messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello", "pinned": True}, {"role": "user", "content": [{"type": "text",
                                                                                             "text": "Bye"}]}]})
GOOD_SHAREGPT = json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]})


def test_parses_openai_and_sharegpt() -> None:
    convs, errors = parse_lines([GOOD_OPENAI, "", "// a comment", GOOD_SHAREGPT])
    assert errors == []
    a, b = convs
    assert (a.id, a.line, a.system) == ("a", 1, "Be brief.")
    assert [(m.id, m.role, m.content, m.pinned) for m in a.messages] == [
        ("m0", "user", "Hi", False), ("m1", "assistant", "Hello", True), ("m2", "user", "Bye", False)]
    assert (b.id, b.line, b.system) == ("line4", 4, None)
    assert [m.role for m in b.messages] == ["user", "assistant"]


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"id": "x", "foo": []}', "expected an OpenAI-style ('messages') or ShareGPT ('conversations') record"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "message 1 has role 'robot'"),
    ('{"conversations": [{"from": "human", "value": "a"}, {"from": "alien", "value": "b"}]}',
     "turn 2 comes 'from' 'alien'"),
    ('{"messages": [{"role": "assistant", "content": "only me"}]}', "no user message"),
    ('{"messages": [{"role": "user", "content": 5}]}', "message 1: content must be a string"),
    ('{"messages": [{"role": "user", "content": "x", "pinned": "yes"}]}', "'pinned' must be true or false"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "'image_url' content part"),
])
def test_malformed_line_reported_with_its_number_others_still_parse(line: str, message: str) -> None:
    convs, errors = parse_lines([GOOD_OPENAI, line, GOOD_SHAREGPT], "convs.jsonl")
    assert [c.line for c in convs] == [1, 3]
    assert len(errors) == 1 and errors[0].line == 2
    assert str(errors[0]).startswith("convs.jsonl:2: ") and message in str(errors[0])


def test_duplicate_conversation_id() -> None:
    convs, errors = parse_lines([GOOD_OPENAI, GOOD_OPENAI], "f")
    assert len(convs) == 1 and str(errors[0]) == "f:2: conversation id 'a' already used on line 1"


def test_shipped_conversations_parse() -> None:
    convs, errors = load_file(DATA / "conversations.jsonl")
    assert errors == [] and len(convs) >= 20
    assert sum(1 for c in convs if c.user_turns >= 10) >= 5  # long enough to prune at a small window
    assert {"tool"} <= {m.role for c in convs for m in c.messages}


def test_policy_syntax() -> None:
    pol = parse_policy(["high=0.8,low=0.5", "kv=shift", "layout=pinned-last", "summarize=off,reserve=64"])
    assert pol == {"reply_reserve": 64, "high_watermark": 0.8, "low_watermark": 0.5, "kv_mode": "shift",
                   "layout": ["system", "summary", "history", "pinned", "new"], "summarize": False}
    cfg = context_config(pol, window=256)
    assert (cfg.window, cfg.reply_reserve, cfg.kv_mode, cfg.layout.order[3]) == (256, 64, "shift", "pinned")
    assert parse_policy(["layout=system,summary,history,pinned,new"])["layout"][-2] == "pinned"
    assert context_config({}, 512, reply_reserve=32).reply_reserve == 32  # replay's default reserve
    assert context_config({"reserve": 100}, 512, reply_reserve=32).reply_reserve == 100


def test_policy_file(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text('{"kv_mode": "shift", "high": 0.7}')
    assert parse_policy([f"@{tmp_path / 'p.json'}", "low=0.3"]) == {
        "high_watermark": 0.7, "low_watermark": 0.3, "kv_mode": "shift"}


@pytest.mark.parametrize(("spec", "message"), [
    (["colour=red"], "unknown policy key 'colour'"),
    (["high"], "is not key=value"),
    (["reserve=lots"], "reply_reserve must be an integer"),
    (["summarize=maybe"], "summarize must be on or off"),
])
def test_policy_errors(spec: list[str], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(spec)


@pytest.mark.parametrize(("pol", "message"), [
    ({"high": 0.5, "low": 0.8}, "watermarks"), ({"kv": "magic"}, "kv_mode"),
    ({"layout": "new/system/pinned/summary/history"}, "layout order"), ({"reserve": 300}, "smaller than the window")])
def test_policy_values_checked_by_context_config(pol: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        context_config(parse_policy([",".join(f"{k}={v}" for k, v in pol.items())]), window=256, reply_reserve=32)


def _turn(step: int, **over: object) -> dict[str, object]:
    rec: dict[str, object] = {
        "type": "turn", "conversation": "c", "line": 1, "step": step, "turn": step, "mode": "generate", "user": "q",
        "plan": {"window": 256, "budget": 240, "tokens": 100, "regions": {"system": 10, "history": 80, "new": 10},
                 "kept": [1, 2, 3], "pinned": [], "summarized": [], "dropped": [], "pruned_now": 0,
                 "truncated": False},
        "prompt_sha256": "ab" * 32, "cache_hit_tokens": 50, "prefill_tokens": 50, "reply": "Paris.",
        "reply_tokens": 3, "finish_reason": "stop", "score": {"tokens": 3, "nll": 1.2345, "top1": 0.5},
        "summary": None, "timing": {"ttft_s": 0.1, "decode_tok_s": 20.0, "wall_s": 0.3}}
    for k, v in over.items():
        if k in ("kept", "dropped", "tokens"):
            rec["plan"] = {**rec["plan"], k: v}  # type: ignore[dict-item]
        else:
            rec[k] = v
    return rec


def test_golden_ignores_timing_and_tiny_score_noise() -> None:
    head = {"type": "replay", "model": "m", "window": 256}
    now = [head, _turn(1, timing={"ttft_s": 9.0}, score={"tokens": 3, "nll": 1.2349, "top1": 0.5}), _turn(2)]
    assert compare(now, [head, _turn(1), _turn(2)]) == []


def test_golden_diff_is_readable_per_turn() -> None:
    head = {"type": "replay", "model": "m", "window": 256}
    golden = [head, _turn(1), _turn(2), _turn(3)]
    now = [{**head, "window": 512}, _turn(1), _turn(2, kept=[2, 3], dropped=[1], tokens=80, reply="Rome.",
                                                   prompt_sha256="cd" * 32), _turn(4)]
    diff = compare(now, golden)
    assert diff == [
        "settings:",
        "  window: 256 -> 512",
        "conversation c turn 2 (step 2):",
        "  plan.tokens: 100 -> 80",
        "  plan.kept: [1, 2, 3] -> [2, 3]  (no longer [1])",
        "  plan.dropped: [] -> [1]  (now also [1])",
        "  prompt_sha256: abababababab… -> cdcdcdcdcdcd…",
        "  reply:",
        "    - golden: 'Paris.'",
        "    + now:    'Rome.'",
        "conversation c turn 3 (step 3): in the golden file, not in this replay",
        "conversation c turn 4 (step 4): new in this replay (not in the golden file)",
        "golden mismatch: 2 record(s) differ, 1 missing, 1 new",
    ]


DEEP = "[" * 100_000 + "]" * 100_000


def test_bom_deep_values_lone_surrogates_and_bad_bytes_are_errors_of_their_line(tmp_path: Path) -> None:
    src = tmp_path / "c.jsonl"
    src.write_bytes(b"\n".join([
        b"\xef\xbb\xbf" + GOOD_OPENAI.encode(),
        b'{"messages": [{"role": "user", "content": "a\\udc80"}]}',
        b'{"messages": [{"role": "user", "content": "x", "name": ' + DEEP.encode() + b"}]}",
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',
        GOOD_SHAREGPT.encode()]) + b"\n")
    convs, errors = load_file(src)
    assert [c.line for c in convs] == [1, 5] and convs[0].id == "a"
    assert [str(e) for e in errors] == [
        f"{src}:2: a string holds a lone surrogate (\\udc80 at character 2), which is not text",
        f"{src}:3: nested more than 64 deep",
        f"{src}:4: not UTF-8 text (byte 0xe9 at byte 47 of the line)"]


def test_records_given_as_values_are_checked_the_same_way() -> None:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    good = json.loads(GOOD_OPENAI)
    convs, errors = as_conversations([good, {"messages": [{"role": "user", "content": "x", "name": deep}]},
                                      {"messages": [{"role": "user", "content": "\ud800"}]}])
    assert [c.id for c in convs] == ["a"]
    assert [str(e) for e in errors] == [
        "<records>:2: nested more than 64 deep",
        "<records>:3: a string holds a lone surrogate (\\ud800 at character 1), which is not text"]
