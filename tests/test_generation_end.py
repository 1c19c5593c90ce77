"""Every end of a generation has final stats: the last event's, or the Generation's after an early close
(finish_reason "cancelled"); the prompt-reuse rule; scoring a continuation; the prefix matcher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from counting import lines_run

import chatcore
from chatcore.prefix import common_prefix, reused_prefix

GREEDY = chatcore.SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> chatcore.Engine:
    return chatcore.load(tiny_llama_dir, device="cpu", dtype="float32", progress=lambda *_: None)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_closing_early_gives_cancelled_stats_and_a_consistent_slot(engine: chatcore.Engine) -> None:
    prompt = ids(30, 1)
    slot = engine.new_slot()
    gen = engine.generate(prompt, GREEDY, slot=slot)
    events = [next(gen) for _ in range(5)]
    assert gen.stats is None   # still running
    gen.close()
    st = gen.stats
    assert st is not None and st.finish_reason == "cancelled" and st.generated_tokens == 5
    assert (st.prompt_tokens, st.cached_tokens, st.prefill_tokens) == (30, 0, 30)
    assert st.ttft_s > 0 and st.decode_s > 0 and st.prefill_s > 0
    assert slot.tokens == prompt + [ev.token_id for ev in events]   # every yielded token's step ran
    # the slot continues from there exactly as an uninterrupted generation does
    whole = [ev.token_id for ev in engine.generate(prompt, GREEDY)]
    held = list(slot.tokens)
    rest = list(engine.generate(held, GREEDY.replace(max_new_tokens=15), slot=slot))
    assert rest[-1].stats.cached_tokens == len(held) - 1
    assert [ev.token_id for ev in events + rest] == whole


def test_leaving_a_loop_and_closing_before_the_first_token(engine: chatcore.Engine) -> None:
    gen = engine.generate(ids(12, 2), GREEDY)
    for _ in gen:
        break
    gen.close()
    assert gen.stats.finish_reason == "cancelled" and gen.stats.generated_tokens == 1
    unstarted = engine.generate(ids(12, 3), GREEDY)
    unstarted.close()
    st = unstarted.stats
    assert st.finish_reason == "cancelled" and st.generated_tokens == 0 and st.prefill_tokens == 12
    assert st.ttft_s == 0.0 and st.decode_s == 0.0


def test_a_finished_generation_keeps_its_last_events_stats(engine: chatcore.Engine) -> None:
    gen = engine.generate(ids(12, 4), GREEDY.replace(max_new_tokens=6))
    events = list(gen)
    gen.close()   # after the end: nothing changes
    assert gen.stats is events[-1].stats and gen.stats.finish_reason == "length"
    assert gen.stats.generated_tokens == 6 == len(events)
    stop = events[2].token_id   # stop on the third token: it is not part of the reply
    gen = engine.generate(ids(12, 4), GREEDY.replace(max_new_tokens=6, stop_token_ids=[stop]))
    ended = list(gen)
    assert ended[-1].token_id == stop and ended[-1].finish_reason == "stop"
    assert gen.stats is ended[-1].stats and gen.stats.generated_tokens == 2


def test_a_repeated_prompt_recomputes_only_its_last_token(engine: chatcore.Engine) -> None:
    prompt = ids(40, 5)
    slot = engine.new_slot()
    engine.prefill(prompt, slot)
    st = list(engine.generate(prompt, GREEDY.replace(max_new_tokens=2), slot=slot))[-1].stats
    assert (st.cached_tokens, st.prefill_tokens) == (39, 1)   # one prompt token runs, for the logits
    assert reused_prefix(prompt + [7, 8], prompt) == 39 and reused_prefix(prompt[:10], prompt) == 10


def test_score_matches_the_logits_of_a_fresh_prefill(engine: chatcore.Engine) -> None:
    prompt, reply = ids(25, 6), ids(7, 7)
    slot = engine.new_slot()
    got = engine.score(prompt, reply, slot=slot)
    logits = engine.logits(prompt + reply)[len(prompt) - 1: -1]
    logp = torch.log_softmax(logits, dim=-1)[torch.arange(len(reply)), torch.tensor(reply)]
    assert got.tokens == 7 and got.nll == pytest.approx(-logp.mean().item(), abs=1e-5)
    assert got.top1 == pytest.approx((logits.argmax(-1) == torch.tensor(reply)).float().mean().item())
    assert (got.prompt_tokens, got.cached_tokens, got.prefill_tokens) == (25, 0, 25) and got.ttft_s > 0
    assert slot.tokens == prompt + reply
    again = engine.score(prompt, reply, slot=slot)   # reuses the prompt but its last token
    assert (again.cached_tokens, again.prefill_tokens) == (24, 1) and again.nll == pytest.approx(got.nll, abs=1e-5)
    none = engine.score(prompt, [], slot=slot)
    assert none.tokens == 0 and none.nll is None and none.top1 is None


def test_common_prefix_compares_blocks_not_elements() -> None:
    a = list(range(33_000))
    for differ in (0, 1, 4095, 4096, 4097, 32_999):
        b = list(a)
        b[differ] = -1
        assert common_prefix(a, b) == differ == common_prefix(tuple(b), a)
    assert common_prefix(a, a[:100]) == 100 and common_prefix([], a) == 0
    # a 33k-token history compared in C a block at a time: a few lines of ours per block, never one per token
    # (counted, not timed; bench/ measures speed)
    b = list(a)
    found, lines = lines_run(lambda: common_prefix(a, b), "chatcore")
    assert found == 33_000 and lines < 100, lines
    b[32_999] = -1   # element by element inside the last block only
    found, lines = lines_run(lambda: common_prefix(a, b), "chatcore")
    assert found == 32_999 and lines < 1_000, lines


def test_the_prefix_module_imports_no_torch() -> None:
    code = "import sys, chatcore.prefix, context; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
