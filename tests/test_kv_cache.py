"""KV cache slot verbs: append, truncate, drop-and-shift with key re-rotation, reset, growth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import chatcore
from chatcore.errors import PromptTooLong


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> chatcore.Engine:
    return chatcore.load(tiny_llama_dir, device="cpu", dtype="float32", prefill_chunk=32)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_drop_shifts_and_rerotates_keys(engine: chatcore.Engine) -> None:
    seq = ids(300, 0)
    slot = engine.new_slot()
    engine.prefill(seq, slot)
    slot.drop(4, 120)                                  # keep 4 "sink" tokens, drop the middle
    kept = seq[:4] + seq[120:]
    assert slot.tokens == kept and slot.length == len(kept)
    fresh = engine.new_slot()
    engine.prefill(kept, fresh)
    n = len(kept)
    # Layer 0's keys and values depend only on token and position: after the shift they must equal a
    # fresh computation at the new positions (deeper layers legitimately remember the dropped tokens).
    assert torch.allclose(slot.k[0, :, :n], fresh.k[0, :, :n], atol=1e-5)
    assert torch.allclose(slot.v[0, :, :n], fresh.v[0, :, :n], atol=1e-6)
    # The first tokens did not move at any layer.
    assert torch.equal(slot.k[:, :, :4], fresh.k[:, :, :4])


def test_truncate_then_continue_equals_fresh(engine: chatcore.Engine) -> None:
    seq, tail = ids(100, 1), ids(30, 2)
    slot = engine.new_slot()
    engine.prefill(seq, slot)
    slot.truncate(60)
    got = engine.prefill(tail, slot)
    fresh = engine.new_slot()
    want = engine.prefill(seq[:60] + tail, fresh)
    assert slot.tokens == seq[:60] + tail
    assert torch.allclose(got, want, atol=1e-5)


def test_reset_and_growth(engine: chatcore.Engine) -> None:
    slot = engine.new_slot()
    assert slot.allocated == 0
    engine.prefill(ids(20, 3), slot)
    small = slot.allocated
    engine.prefill(ids(400, 4), slot)
    assert slot.length == 420 and slot.allocated >= 420 > small
    slot.reset()
    assert slot.length == 0 and slot.common_prefix(ids(5, 3)) == 0


def test_capacity_is_enforced(engine: chatcore.Engine) -> None:
    slot = engine.new_slot(capacity=64)
    with pytest.raises(PromptTooLong, match="context window"):
        engine.prefill(ids(65, 5), slot)
    assert slot.length == 0
    with pytest.raises(PromptTooLong):
        list(engine.generate(ids(600, 6)))


def test_generation_stops_when_the_window_is_full(engine: chatcore.Engine) -> None:
    slot = engine.new_slot(capacity=50)
    events = list(engine.generate(ids(45, 7), chatcore.SamplingParams(max_new_tokens=100, ignore_eos=True),
                                  slot=slot))
    assert events[-1].finish_reason == "length"
    assert slot.length == 50


@pytest.mark.parametrize("bad", [(-1, 5), (3, 2), (0, 10_000)])
def test_bad_spans_are_refused(engine: chatcore.Engine, bad: tuple[int, int]) -> None:
    slot = engine.new_slot()
    engine.prefill(ids(20, 8), slot)
    with pytest.raises(ValueError):
        slot.drop(*bad)
    assert slot.length == 20


def test_sink_window_streams_past_the_window_with_flat_memory(engine: chatcore.Engine) -> None:
    slot = engine.new_slot(capacity=64)
    prompt = ids(150, 9)                                   # longer than the window: streamed through
    params = chatcore.SamplingParams(max_new_tokens=400, ignore_eos=True, temperature=0.9, seed=1)
    sizes = set()
    events = []
    for ev in engine.generate(prompt, params, slot=slot, sink_tokens=4):
        events.append(ev)
        sizes.add(slot.allocated)
        assert slot.length <= 64
    stats = events[-1].stats
    assert len(events) == 400 and stats.finish_reason == "length"
    assert sizes == {64}                                   # memory never grew past the window
    assert slot.tokens[:4] == prompt[:4]                   # the sinks stay
    assert stats.prefill_tokens == 150 and stats.discarded_tokens == 150 + 399 - slot.length
    with pytest.raises(ValueError, match="sink_tokens"):
        engine.prefill(ids(10, 1), engine.new_slot(capacity=8), sink_tokens=7)


def test_common_prefix_finds_the_first_difference_across_blocks(engine: chatcore.Engine) -> None:
    slot = engine.model.new_slot(64)
    slot.tokens = list(range(10_000))   # only the ids matter here: common_prefix reads no tensor
    for differ in (0, 1, 4095, 4096, 4097, 8191, 9_999):
        other = list(range(10_000))
        other[differ] = -1
        assert slot.common_prefix(other) == differ
        assert slot.common_prefix(tuple(other)) == differ
    assert slot.common_prefix(list(range(12_000))) == 10_000   # the slot's tokens all match
    assert slot.common_prefix(list(range(5_000))) == 5_000     # the request is shorter


@pytest.mark.parametrize(("ids", "error"), [
    ([], "the prompt is empty"), ([1, 2.5], "flat sequence of integer"), ([[1, 2]], "flat sequence of integer"),
    ("hello", "flat sequence of integer"), ([1, 2**70], "flat sequence of integer"),
    ([1, -3], "token id -3 is outside"),
])
def test_bad_prompt_ids_get_one_clear_error(engine: chatcore.Engine, ids: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        list(engine.generate(ids, chatcore.SamplingParams(max_new_tokens=1)))


def test_prompt_ids_of_any_integer_sequence_are_accepted(engine: chatcore.Engine) -> None:
    params = chatcore.SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
    want = [ev.token_id for ev in engine.generate([5, 6, 7], params)]
    for ids in ((5, 6, 7), np.array([5, 6, 7]), torch.tensor([5, 6, 7])):
        assert [ev.token_id for ev in engine.generate(ids, params)] == want
