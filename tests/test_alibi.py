"""ALiBi: slopes for every head count 1..64 against transformers (BLOOM's and MPT's rules), and the KV
cache of an ALiBi model (no rotation: a drop only moves keys, and continuing equals a fresh prefill)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_check import prompt
from model_factory import make_bloom_dir, make_mpt_dir

import chatcore
from chatcore.layers.alibi import bloom_slopes, mpt_slopes

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: repeatable float sums


def test_bloom_slopes_match_transformers_for_1_to_64_heads() -> None:
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor

    for heads in range(1, 65):
        ours = bloom_slopes(heads)
        assert ours.shape == (heads,)
        assert torch.equal(ours, _get_alibi_slopes(heads, torch.device("cpu"))), heads
        # and through the public tensor builder: slope x key position
        alibi = build_alibi_tensor(torch.ones(1, 3, dtype=torch.long), heads, torch.float32)
        assert torch.equal(alibi[:, 0, 1], ours), heads


@pytest.mark.parametrize("bias_max", [8, 6, 16])
def test_mpt_slopes_match_transformers_for_1_to_64_heads(bias_max: int) -> None:
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    for heads in range(1, 65):
        theirs = build_mpt_alibi_tensor(heads, 2, alibi_bias_max=bias_max)  # [heads, 1, 2]: slope x (j - 1)
        assert torch.equal(mpt_slopes(heads, bias_max), -theirs[:, 0, 0]), heads


def test_the_two_rules_agree_at_bias_max_8() -> None:
    """Formulated differently (BLOOM: two geometric series; MPT: every other slope of the next power of
    two, interleaved), they give the same slopes for every head count at MPT's default bias max."""
    for heads in range(1, 65):
        torch.testing.assert_close(bloom_slopes(heads), mpt_slopes(heads, 8.0))
    assert not torch.allclose(mpt_slopes(6, 16.0), bloom_slopes(6))
    with pytest.raises(ValueError):
        bloom_slopes(0)


@pytest.mark.parametrize("maker", [make_bloom_dir, make_mpt_dir])
def test_alibi_cache_drop_moves_keys_without_rotation(maker, tmp_path: Path) -> None:  # noqa: ANN001
    engine = chatcore.load(maker(tmp_path), device="cpu", dtype="float32", prefill_chunk=32)
    slot = engine.new_slot()
    assert slot.rotary is None
    ids = prompt(150, seed=4)
    engine.prefill(ids, slot)
    before = slot.k[:, :, 60:150].clone()
    slot.drop(4, 60)
    assert torch.equal(slot.k[:, :, 4:94], before)              # moved as they were
    fresh = engine.new_slot()
    engine.prefill(ids[:4] + ids[60:], fresh)
    torch.testing.assert_close(slot.k[0, :, :94], fresh.k[0, :, :94], rtol=0, atol=1e-6)
    # continuing a truncated slot equals a fresh prefill of the same tokens (deeper layers of the shifted
    # slot legitimately remember the dropped tokens, so this uses the fresh one)
    fresh.truncate(50)
    tail = prompt(30, seed=5)
    got = engine.prefill(tail, fresh)
    want = engine.prefill(fresh.tokens[:50] + tail, engine.new_slot())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
