"""A stream longer than the window: attention sinks, constant cache, no re-prefill, flat speed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from _context_helpers import make_chat_model_dir

import chatcore
from chatcore.sampling import SamplingParams
from context import stream_with_sinks


@pytest.fixture(scope="module")
def small_engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path: Path = tmp_path_factory.mktemp("sink-model")
    make_chat_model_dir(path, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1)
    return chatcore.load(path, device="cpu", dtype="float32", max_seq_len=512)


@pytest.mark.slow
def test_20000_tokens_through_a_512_window(small_engine: Any) -> None:
    engine = small_engine
    slot = engine.new_slot(512)
    prompt = list(range(20, 120))
    params = SamplingParams(max_new_tokens=20_000, temperature=1.0, seed=7, ignore_eos=True)
    sizes, stamps = set(), []
    n, last = 0, None
    t0 = time.perf_counter()
    for ev in stream_with_sinks(engine, prompt, params, sinks=4, slot=slot):
        n += 1
        last = ev
        if n > 600:  # past the first shift: the slot holds the whole window
            sizes.add(slot.nbytes())
        if n % 2000 == 0:
            stamps.append(time.perf_counter())
        assert slot.length <= 512
        assert slot.tokens[:4] == prompt[:4]  # the sinks never move
    assert n == 20_000 and last is not None and last.stats.generated_tokens == 20_000
    assert len(sizes) == 1, f"cache size changed: {sorted(sizes)}"  # flat once the window is full
    assert slot.allocated == 512
    assert last.stats.prefill_tokens == len(prompt)  # the prompt only: nothing re-prefilled
    first = stamps[1] - stamps[0]
    worst = max(b - a for a, b in zip(stamps[1:], stamps[2:], strict=False))
    assert worst < 2.5 * first, f"per-token time grew: {first:.2f}s -> {worst:.2f}s per 2,000 tokens"
    assert time.perf_counter() - t0 < 120
