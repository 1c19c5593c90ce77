"""PagedSlot's verb API against KVCache's (the same keys and values after truncate, drop with re-rotation, reset;
float and quantized), copy on write, prefix sharing by counting blocks, eviction, sizing, DeviceBatchStep."""

from __future__ import annotations

import gc
from pathlib import Path

import model_factory
import pytest
import torch
from family_check import prompt

import chatcore
from chatcore.batch.paged import PagedPool, block_nbytes
from chatcore.batch.paged_runner import PagedRunner
from chatcore.batch.runner import Work
from chatcore.batch.step import BatchStep, DeviceBatchStep
from chatcore.errors import OutOfBlocks

pytestmark = pytest.mark.usefixtures("one_thread")

BS = 16


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_factory.make_llama_dir(tmp_path_factory.mktemp("slot-llama"), seed=7)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_factory.make_gemma3_dir(tmp_path_factory.mktemp("slot-gemma"), seed=8)


def _engine(path: Path, **kw: object) -> chatcore.Engine:
    return chatcore.load(path, device="cpu", dtype="float32", attention="torch", **kw)


def _same_kv(paged, cache, n: int, layers: int, atol: float = 1e-5) -> None:  # noqa: ANN001
    for layer in range(layers):
        pk, pv = paged.layer_kv(layer, n)
        ck, cv = cache.layer_kv(layer, n)
        torch.testing.assert_close(pk, ck, atol=atol, rtol=1e-5)
        torch.testing.assert_close(pv, cv, atol=atol, rtol=1e-5)


@pytest.mark.parametrize(("model", "kv_dtype"), [("llama", None), ("llama", "int8"), ("llama", "fp8"),
                                                 ("gemma", None)])
def test_verbs_match_kv_cache(llama_dir: Path, gemma_dir: Path, model: str, kv_dtype: str | None) -> None:
    engine = _engine(llama_dir if model == "llama" else gemma_dir, kv_dtype=kv_dtype)
    layers = engine.config.num_layers
    runner = PagedRunner(engine.model, PagedPool.for_model(engine.model, num_blocks=32, block_size=BS))
    paged, cache = runner.new_slot(256), engine.new_slot(256)
    assert paged.quantized == cache.quantized == (kv_dtype is not None) and paged.dtype == cache.dtype
    seq = prompt(70, seed=1)
    runner.run([Work(paged, seq)])
    engine.prefill(seq, cache)
    assert paged.tokens == cache.tokens == seq and len(paged.blocks) == 5
    _same_kv(paged, cache, 70, layers)
    # drop [5, 37): 33 keys move back across block edges, re-rotated
    paged.drop(5, 37)
    cache.drop(5, 37)
    assert paged.tokens == cache.tokens and paged.length == 38 and len(paged.blocks) == 3
    _same_kv(paged, cache, 38, layers, atol=1e-4 if kv_dtype else 1e-5)
    # truncate into a block, then continue both: the same logits
    paged.truncate(21)
    cache.truncate(21)
    tail = prompt(9, seed=2)
    got = runner.run([Work(paged, tail)])[0]
    want = engine.prefill(tail, cache)[-1].float()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    _same_kv(paged, cache, 30, layers, atol=1e-4 if kv_dtype else 1e-5)
    assert paged.common_prefix(cache.tokens + [1]) == 30
    paged.reset()
    assert paged.length == 0 and not paged.blocks and runner.pool.allocator.in_use == 0
    with pytest.raises(ValueError, match="cannot drop"):
        paged.drop(0, 1)
    with pytest.raises(ValueError, match="cannot truncate"):
        paged.truncate(1)


def test_shared_system_prompt_takes_fewer_blocks(llama_dir: Path) -> None:
    engine = _engine(llama_dir)
    system = prompt(48, seed=3)                    # three full blocks
    turns = [prompt(10, seed=4), prompt(10, seed=5)]

    def blocks_for(shared: bool) -> tuple[int, list[torch.Tensor]]:
        runner = PagedRunner(engine.model, PagedPool.for_model(engine.model, num_blocks=32, block_size=BS))
        first = system if shared else prompt(48, seed=6)
        a, b = runner.new_slot(128), runner.new_slot(128)
        out = [runner.run([Work(a, first + turns[0])])]
        out.append(runner.run([Work(b, system + turns[1])]))
        return runner.pool.allocator.in_use, out

    shared, logits = blocks_for(True)
    separate, _ = blocks_for(False)
    assert separate == 8 and shared == 5        # 4 + 4 blocks, or the 3 system blocks once
    serial = engine.new_slot(128)
    torch.testing.assert_close(logits[1][0], engine.prefill(system + turns[1], serial)[-1].float(), atol=1e-4,
                               rtol=1e-4)


def test_copy_on_write_leaves_the_other_sequence_alone(llama_dir: Path) -> None:
    engine = _engine(llama_dir)
    pool = PagedPool.for_model(engine.model, num_blocks=32, block_size=BS)
    runner = PagedRunner(engine.model, pool)
    seq = prompt(40, seed=7)
    a, b = runner.new_slot(128), runner.new_slot(128)
    runner.run([Work(a, seq)])
    runner.run([Work(b, seq[:32] + [5])])
    assert b.blocks[:2] == a.blocks[:2] and pool.allocator.refcount(a.blocks[0]) == 2
    before = [a.layer_kv(layer, 40) for layer in range(engine.config.num_layers)]
    b.truncate(20)                                 # into the second shared block
    runner.run([Work(b, prompt(8, seed=8))])       # writes there: b copies the block first
    assert b.blocks[0] == a.blocks[0] and b.blocks[1] != a.blocks[1]
    assert pool.allocator.refcount(a.blocks[1]) == 1
    for layer, (k, v) in enumerate(before):
        ka, va = a.layer_kv(layer, 40)
        assert torch.equal(ka, k) and torch.equal(va, v)
    b.drop(2, 10)                                  # rewrites from block 0 on: copied too
    assert b.blocks[0] != a.blocks[0] and pool.allocator.refcount(a.blocks[0]) == 1
    assert torch.equal(a.layer_kv(0, 40)[0], before[0][0])


def test_idle_slots_are_evicted_least_recently_used_first(llama_dir: Path) -> None:
    engine = _engine(llama_dir)
    pool = PagedPool.for_model(engine.model, num_blocks=7, block_size=BS)   # 6 usable blocks
    runner = PagedRunner(engine.model, pool)
    a, b, c = (runner.new_slot(128) for _ in range(3))
    runner.run([Work(a, prompt(30, seed=9))])      # 2 blocks
    runner.run([Work(b, prompt(30, seed=10))])     # 2 blocks
    runner.run([Work(a, [3])])                     # a used more recently than b
    runner.run([Work(c, prompt(60, seed=11))])     # 4 blocks: b (idle, least recent) gives its 2 back
    assert b.length == 0 and not b.blocks and a.length == 31 and pool.evictions == 1
    assert b.nbytes() == 0 and c.nbytes() == 4 * pool.block_bytes
    with pytest.raises(OutOfBlocks, match="paged KV memory is full"):
        runner.run([Work(a, prompt(40, seed=12)), Work(c, prompt(40, seed=13))])   # both running: none to evict
    # a slot dropped without a reset gives its blocks back at the next allocation
    held = pool.allocator.in_use
    del c
    gc.collect()
    d = runner.new_slot(128)
    runner.run([Work(d, [4])])
    assert pool.allocator.in_use < held


def test_pool_layout_and_sizing(llama_dir: Path) -> None:
    engine = _engine(llama_dir, kv_dtype="int8")
    cfg = engine.config
    per = block_nbytes(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       block_size=BS, dtype=torch.float32, kv_dtype="int8")
    assert per == cfg.num_layers * BS * 2 * (cfg.num_kv_heads * cfg.head_dim + 4 * cfg.num_kv_heads)
    pool = PagedPool.for_model(engine.model, memory=10 * per + per // 2, block_size=BS)
    assert pool.num_blocks == 10 and pool.nbytes() == 10 * per
    assert pool.k.shape == (cfg.num_layers, 10, BS, cfg.num_kv_heads, cfg.head_dim) and pool.k.dtype == torch.int8
    assert pool.k_scale is not None and pool.k_scale.shape == (cfg.num_layers, 10, BS, cfg.num_kv_heads)
    with pytest.raises(OutOfBlocks, match="fewer than 2 blocks"):
        PagedPool.for_model(engine.model, memory=per, block_size=BS)
    slot = pool.new_slot(64)
    slot.reserve(20)
    assert 0 not in slot.blocks and slot.table(4) == slot.blocks + [0, 0]


def test_device_batch_step_equals_batch_step(llama_dir: Path) -> None:
    engine = _engine(llama_dir)
    pool = PagedPool.for_model(engine.model, num_blocks=32, block_size=BS)
    runner = PagedRunner(engine.model, pool)
    slots = [runner.new_slot(128) for _ in range(3)]
    runner.run([Work(s, prompt(n, seed=n)) for s, n in zip(slots, (15, 16, 40), strict=True)])
    for s in slots:
        s.reserve(1)
    tokens = torch.tensor([5, 6, 7])
    host = engine.model.run(tokens, BatchStep(pool, slots, [1, 1, 1], "torch"))
    # the same step from device tensors, plus one padded row on the scratch block
    positions = torch.tensor([s.length for s in slots] + [0], dtype=torch.int32)
    tables = torch.tensor([s.table(4) for s in slots] + [[0] * 4], dtype=torch.int32)
    step = DeviceBatchStep(pool, positions, tables, positions + 1, "torch")
    device = engine.model.run(torch.cat([tokens, torch.tensor([0])]), step)
    torch.testing.assert_close(device[:3], host, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
@pytest.mark.parametrize("first", ["sliding_attention", "full_attention"])
def test_drop_rerotates_each_layers_keys_with_its_own_rotary(tmp_path: Path, kv_dtype: str | None,
                                                             first: str) -> None:
    """Gemma 3's sliding and full layers have different RoPE bases: after a drop, layer 0's keys (which depend
    only on token and position) equal a fresh prefill's of the kept tokens, with layer 0 of either kind."""
    layer_types = [first, "sliding_attention", "full_attention", "sliding_attention"]
    engine = _engine(model_factory.make_gemma3_dir(tmp_path / "g", seed=9, layer_types=layer_types),
                     kv_dtype=kv_dtype)
    runner = PagedRunner(engine.model, PagedPool.for_model(engine.model, num_blocks=32, block_size=BS))
    seq = prompt(60, seed=20)
    slot, fresh = runner.new_slot(128), runner.new_slot(128)
    runner.run([Work(slot, seq)])
    slot.drop(3, 25)
    runner.run([Work(fresh, seq[:3] + seq[25:])])
    assert slot.tokens == fresh.tokens
    k, v = slot.layer_kv(0, 38)
    kf, vf = fresh.layer_kv(0, 38)
    tol = 1e-5 if kv_dtype is None else 0.05
    torch.testing.assert_close(k, kf, atol=tol, rtol=1e-4)
    torch.testing.assert_close(v, vf, atol=tol, rtol=1e-4)
