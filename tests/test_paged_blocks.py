"""BlockAllocator: reference counts, the hash-chain prefix cache, LRU reuse of freed cached blocks, OutOfBlocks."""

from __future__ import annotations

import pytest

from chatcore.batch.blocks import ROOT, BlockAllocator, chain_key
from chatcore.errors import ChatcoreError, OutOfBlocks

BS = 4


def _seq(n: int, base: int = 0) -> list[int]:
    return [base + i for i in range(n)]


def _register_all(a: BlockAllocator, blocks: list[int], tokens: list[int]) -> list[int]:
    keys, parent = [], ROOT
    for i, b in enumerate(blocks):
        parent = a.register(b, parent, tokens[i * BS: (i + 1) * BS])
        keys.append(parent)
    return keys


def test_alloc_free_and_refcounts() -> None:
    a = BlockAllocator(6, BS)
    assert a.usable == 5 and a.available == 5
    got = a.alloc(3)
    assert len(set(got)) == 3 and 0 not in got and all(a.refcount(b) == 1 for b in got)
    assert a.in_use == 3 and a.available == 2
    a.free(got[:1])
    assert a.refcount(got[0]) == 0 and a.available == 3
    with pytest.raises(ValueError, match="not held"):
        a.free(got[:1])
    a.free(got[1:])
    assert a.in_use == 0
    assert sorted(a.alloc(5)) == [1, 2, 3, 4, 5]   # block 0 is never given


def test_out_of_blocks_is_all_or_nothing_with_one_clear_line() -> None:
    a = BlockAllocator(4, BS)
    a.alloc(2)
    with pytest.raises(OutOfBlocks) as err:
        a.alloc(2)
    assert isinstance(err.value, ChatcoreError)
    message = str(err.value)
    assert "\n" not in message and "2 more blocks of 4 tokens" in message and "1 of 3 are free" in message
    assert a.available == 1   # nothing was taken by the failed call


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="power of two"):
        BlockAllocator(8, 12)
    with pytest.raises(ValueError, match="none to give"):
        BlockAllocator(1, 16)


def test_prefix_blocks_are_shared_through_the_hash_chain() -> None:
    a = BlockAllocator(10, BS)
    tokens = _seq(10)   # two full blocks and a partial one
    blocks = a.alloc(3)
    keys = _register_all(a, blocks[:2], tokens)
    assert keys[0] == chain_key(ROOT, tokens[:4]) and keys[1] == chain_key(keys[0], tokens[4:8])
    # a second sequence with the same first 9 tokens shares the two full blocks
    got = a.match(tokens[:9])
    assert got == blocks[:2] and [a.refcount(b) for b in got] == [2, 2] and a.hits == 2
    # a different first block breaks the chain even where a later block's tokens are equal
    other = _seq(4, base=100) + tokens[4:8]
    assert a.match(other) == []
    # a match continues after a known parent
    assert a.match(tokens[4:8], parent=keys[0]) == [blocks[1]]
    assert a.refcount(blocks[1]) == 3
    # only full blocks register; a second block with a known key leaves the first one shared
    with pytest.raises(ValueError, match="full blocks"):
        a.register(blocks[2], keys[1], tokens[8:])
    twin = a.alloc(1)[0]
    assert a.register(twin, ROOT, tokens[:4]) == keys[0] and not a.registered(twin)


def test_freed_cached_blocks_stay_matchable_until_recycled_lru() -> None:
    a = BlockAllocator(5, BS)          # 4 usable blocks
    first, second = a.alloc(1), a.alloc(1)
    _register_all(a, first, _seq(4))
    _register_all(a, second, _seq(4, base=50))
    a.free(first)                      # freed first: the least recent
    a.free(second)
    assert a.available == 4 and a.in_use == 0
    fresh = a.alloc(2)                 # never-registered blocks go first
    assert set(fresh).isdisjoint(first + second) and a.recycled == 0
    assert a.match(_seq(4, base=50)) == second   # still there, and held again
    a.free(second)
    # now memory is needed: the least recently freed registered block is recycled first
    assert a.alloc(1) == first and a.recycled == 1
    assert a.match(_seq(4)) == [] and not a.registered(first[0])
    assert a.match(_seq(4, base=50)) == second


def test_forget_turns_an_idle_cached_block_into_a_free_one() -> None:
    a = BlockAllocator(3, BS)
    b = a.alloc(1)
    _register_all(a, b, _seq(4))
    a.free(b)
    a.forget(b[0])
    assert not a.registered(b[0]) and a.match(_seq(4)) == []
    assert a.alloc(2) and a.recycled == 0
