"""A stream longer than the window: attention sinks, constant cache, no re-prefill, flat work per token.

Work is counted (tokens per forward pass, rows attended), never timed: speed is measured in bench/."""

from __future__ import annotations

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
def test_20000_tokens_through_a_512_window(small_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = small_engine
    slot = engine.new_slot(512)
    passes: list[tuple[int, int]] = []  # per forward pass: tokens computed, rows already in the slot
    forward = engine.model.forward

    def counted(ids: Any, s: Any, **kw: Any) -> Any:
        passes.append((int(ids.shape[0]), s.length))
        return forward(ids, s, **kw)

    monkeypatch.setattr(engine.model, "forward", counted)
    prompt = list(range(20, 120))
    params = SamplingParams(max_new_tokens=20_000, temperature=1.0, seed=7, ignore_eos=True)
    sizes = set()
    n, last = 0, None
    for ev in stream_with_sinks(engine, prompt, params, sinks=4, slot=slot):
        n += 1
        last = ev
        if n > 600:  # past the first shift: the slot holds the whole window
            sizes.add(slot.nbytes())
        assert slot.length <= 512
        assert slot.tokens[:4] == prompt[:4]  # the sinks never move
    assert n == 20_000 and last is not None and last.stats.generated_tokens == 20_000
    assert len(sizes) == 1, f"cache size changed: {sorted(sizes)}"  # flat once the window is full
    assert slot.allocated == 512
    assert last.stats.prefill_tokens == len(prompt)  # the prompt only: nothing re-prefilled
    # Flat work per token, counted: the prompt in one pass, then one pass of one token per generated token
    # (the last one is sampled, never run), each attending to at most the window's 512 rows.
    assert passes[0] == (len(prompt), 0)
    decode = passes[1:]
    assert len(decode) == 19_999 and {t for t, _ in decode} == {1}, "a pass computed more than one token"
    assert max(rows for _, rows in decode) + 1 <= 512
    assert sum(t for t, _ in passes) == len(prompt) + 19_999  # no token computed twice
    assert last.stats.discarded_tokens == len(prompt) + 19_999 - slot.length > 19_000  # shifted out, not kept
