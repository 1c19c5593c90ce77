"""KV reuse: plan operations on plain lists, exactness against a fresh prefill, the K-shift rotation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _context_helpers import drain, make_chat_model_dir, reuse_matches_fresh_prefill

import chatcore
from chatcore.models import FAMILIES
from context import ChatSession, ContextConfig, plan_kv


class ListSlot:
    def __init__(self, tokens: list[int]) -> None:
        self.tokens = list(tokens)

    def truncate(self, n: int) -> None:
        del self.tokens[n:]

    def drop(self, start: int, end: int) -> None:
        del self.tokens[start:end]


def test_plan_kv_exact_and_shift_on_plain_lists() -> None:
    sys_, t1, t2, t3, new = [1] * 10, list(range(100, 140)), list(range(200, 240)), list(range(300, 340)), [9, 9]
    slot_tokens = sys_ + t1 + t2 + t3 + [7, 7, 7]  # the previous prompt and its reply
    ids = sys_ + t2 + t3 + new  # t1 pruned
    exact = plan_kv(slot_tokens, ids, "exact")
    assert (exact.keep, exact.drop, exact.prefill) == (10, None, len(ids) - 10)
    shift = plan_kv(slot_tokens, ids, "shift", boundaries=[0, 10, 50, 90, 130])
    assert shift.drop == (10, 50) and shift.reused == 90 and shift.prefill == 2
    slot = ListSlot(slot_tokens)
    shift.apply(slot)
    assert slot.tokens == ids[:90]
    # a run too short to be worth a shift stays exact
    assert plan_kv(slot_tokens, ids, "shift", boundaries=[50], min_shift=100).drop is None


def _family_dirs() -> list[Any]:
    """One tiny chat checkpoint per model family chatcore implements (ALiBi ones when they land)."""
    import model_factory

    out = []
    for name in sorted(FAMILIES):
        maker = getattr(model_factory, f"make_{name}_dir", None)
        out.append(pytest.param(name, marks=() if maker else pytest.mark.skip(
            reason=f"tests/model_factory.py has no make_{name}_dir yet")))
    return out


@pytest.fixture(scope="module")
def family_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    name = request.param
    path: Path = tmp_path_factory.mktemp(f"kv-{name}")
    if name == "llama":
        make_chat_model_dir(path)
    else:  # a future family: its factory, plus our byte-level tokenizer and ChatML
        import model_factory

        make_chat_model_dir(path, _maker=getattr(model_factory, f"make_{name}_dir"))
    return chatcore.load(path, device="cpu", dtype="float32", max_seq_len=512)


@pytest.mark.parametrize("family_engine", _family_dirs(), indirect=True)
def test_kv_exact_after_turns_prunings_and_edits(family_engine: Any, store: Any) -> None:
    engine = family_engine
    cfg = ContextConfig(window=400, reply_reserve=60)
    s = ChatSession.create(engine, store, system="Be short.", config=cfg, max_new_tokens=12, temperature=0.0)
    reused = []
    for i in range(9):
        reused.append(reuse_matches_fresh_prefill(engine, s, f"message number {i} " + "x" * (i * 7)))
        ev = drain(s.send(f"message number {i} " + "x" * (i * 7)))
        if i == 3:
            s.pin(s.messages()[0].id)
    assert ev.report is not None and ev.report.turns_dropped > 0, "the test never pruned"
    assert max(reused) > 100  # the cache was really reused
    first_user = [m for m in s.messages() if m.role == "user"][-3]
    ev = drain(s.edit(first_user.id, "an edited question"))
    reuse_matches_fresh_prefill(engine, s, "after the edit")
    ev = drain(s.regenerate())
    reuse_matches_fresh_prefill(engine, s, "after regenerating")


def test_shift_mode_drops_and_shifts_instead_of_reprefilling(chat_engine: Any, store: Any) -> None:
    cfg = ContextConfig(window=400, reply_reserve=60, kv_mode="shift")
    s = ChatSession.create(chat_engine, store, system="Be short.", config=cfg, max_new_tokens=8)
    shifted = False
    for i in range(10):
        ev = drain(s.send(f"turn {i} " + "y" * 40))
        r = ev.report
        if r.turns_dropped and r.prefill_tokens < r.tokens_by_region["new"] + 30 and r.cache_hit_tokens > 60:
            shifted = True
    assert shifted, "no turn reused the cache across a pruning"


def test_k_shift_rotation_equals_key_at_new_position(chat_engine: Any) -> None:
    """A cached key rotated by -delta equals the key computed at the new position (layer 0, whose keys
    depend only on the token and its position)."""
    ids = list(range(20, 80))
    slot = chat_engine.new_slot(128)
    chat_engine.prefill(ids, slot)
    slot.drop(4, 24)  # 20 tokens out: the following 36 keys move back by 20
    fresh = chat_engine.new_slot(128)
    chat_engine.prefill(ids[:4] + ids[24:], fresh)
    assert slot.tokens == fresh.tokens
    torch.testing.assert_close(slot.k[0, :, : slot.length], fresh.k[0, :, : fresh.length], rtol=0, atol=1e-5)
    torch.testing.assert_close(slot.v[0, :, : slot.length], fresh.v[0, :, : fresh.length], rtol=0, atol=1e-6)
