"""The scheduler stepped by hand: what each batched forward pass holds, counted (never timed)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import chatcore
from chatcore.batch.runner import SerialRunner, Work
from chatcore.batch.scheduler import Failure, OutOfBlocks, Request, Scheduler
from chatcore.engine import Engine
from chatcore.generation import ReplyState
from chatcore.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> chatcore.Engine:
    from model_factory import make_llama_dir

    path: Path = make_llama_dir(tmp_path_factory.mktemp("sched-llama"))
    return chatcore.load(path, device="cpu", dtype="float32", max_seq_len=128)


@pytest.fixture(autouse=True)
def _one(one_thread: None) -> Iterator[None]:
    yield


class Recorder(SerialRunner):
    """The serial runner, recording each run's works as (slot, tokens)."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.runs: list[list[tuple[int, int]]] = []

    def run(self, works: Sequence[Work]) -> torch.Tensor:
        self.runs.append([(id(w.slot), len(w.ids)) for w in works])
        return super().run(works)


def scheduler(engine: Engine, runner: Any, max_batch: int = 8) -> Scheduler:
    return Scheduler(runner, max_batch=max_batch, make_room=engine.make_room, shift=Engine._shift_size)


def request(engine: Engine, runner: Any, ids: list[int], params: SamplingParams, *, chunk: int = 512,
            owned: bool = False) -> Request:
    reply = ReplyState(ids, params, 0, time.perf_counter(), 0, vocab_size=engine.config.vocab_size,
                       device=engine.runtime.device, tokenizer=engine.tokenizer, eos_ids=engine.eos_token_ids)
    return Request(runner.new_slot(engine.window), list(ids), reply, chunk=chunk, owned=owned)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def tokens(req: Request) -> list[int]:
    out = []
    while not req.events.empty():
        item = req.events.get()
        assert not isinstance(item, Failure), item.exc
        out.append(item.token_id)
    return out


def run_all(s: Scheduler, limit: int = 1000) -> int:
    n = 0
    while s.step():
        n += 1
        assert n < limit
    return n


LONG = SamplingParams(max_new_tokens=40, ignore_eos=True)


def test_a_long_prompt_prefills_a_chunk_per_step_while_the_others_decode(engine: Engine) -> None:
    runner = Recorder(engine.model)
    s = scheduler(engine, runner)
    short = [request(engine, runner, prompt(5, i), LONG, chunk=8) for i in range(3)]
    for r in short:
        s.submit(r)
    for _ in range(3):   # one prompt per step: after three steps all three decode
        s.step()
    assert all(r.decoding for r in short)
    long = request(engine, runner, prompt(40, 9), LONG, chunk=8)
    s.submit(long)
    slots = {id(r.slot) for r in short}
    for k in range(5):   # 40 tokens in chunks of 8: five steps, each with a decode token of every other sequence
        before = [r.events.qsize() for r in short]
        s.step()
        run = runner.runs[-1]
        assert sorted(n for sid, n in run if sid in slots) == [1, 1, 1]
        assert (id(long.slot), 8) in run and len(run) == 4
        assert [r.events.qsize() for r in short] == [b + 1 for b in before]
        assert long.slot.length == 8 * (k + 1)
    s.step()
    assert sorted(n for _, n in runner.runs[-1]) == [1, 1, 1, 1]   # the long one decodes with them now
    run_all(s)


def test_eight_decodes_run_together(engine: Engine) -> None:
    runner = Recorder(engine.model)
    s = scheduler(engine, runner)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    reqs = [request(engine, runner, prompt(6, 20 + i), params) for i in range(8)]
    want = [[e.token_id for e in engine.generate(r.todo, params)] for r in reqs]
    for r in reqs:
        s.submit(r)
    steps = run_all(s)
    assert [tokens(r) for r in reqs] == want
    # 8 prompt steps (one each), then ~10 decode steps with all eight together, not 8 x 10
    assert steps == len(runner.runs) <= 8 + 10
    assert max(len(run) for run in runner.runs) == 8
    assert sum(len(run) for run in runner.runs) == 8 + 8 * 9   # each prompt once, then 9 fed tokens each


def test_max_batch_makes_the_rest_wait(engine: Engine) -> None:
    runner = Recorder(engine.model)
    s = scheduler(engine, runner, max_batch=2)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    reqs = [request(engine, runner, prompt(4, 30 + i), params) for i in range(4)]
    for r in reqs:
        s.submit(r)
    run_all(s)
    assert max(len(run) for run in runner.runs) == 2
    assert all(len(tokens(r)) == 5 for r in reqs)


class BlockBudget:
    """A fake paged memory: every slot of a runner holds whole blocks of ``block`` tokens, ``total`` at most;
    reserving past it raises OutOfBlocks (as the paged pool does)."""

    def __init__(self, block: int, total: int) -> None:
        self.block, self.total, self.held, self.peak, self.resets = block, total, {}, 0, 0

    def blocks(self, n: int) -> int:
        return -(-n // self.block)

    def wrap(self, slot: Any) -> Any:
        reserve, reset, truncate = slot.reserve, slot.reset, slot.truncate

        def reserve_(extra: int) -> None:
            need = self.blocks(slot.length + extra)
            others = sum(v for k, v in self.held.items() if k != id(slot))
            if need > self.held.get(id(slot), 0) and others + need > self.total:
                raise OutOfBlocks("no KV block is free")
            self.held[id(slot)] = max(need, self.held.get(id(slot), 0))
            self.peak = max(self.peak, sum(self.held.values()))
            reserve(extra)

        def reset_() -> None:
            self.held[id(slot)] = 0
            self.resets += 1
            reset()

        def truncate_(n: int) -> None:
            self.held[id(slot)] = self.blocks(n)
            truncate(n)
        slot.reserve, slot.reset, slot.truncate = reserve_, reset_, truncate_
        return slot


class TightRunner(Recorder):
    def __init__(self, model: Any, budget: BlockBudget) -> None:
        super().__init__(model)
        self.budget = budget

    def new_slot(self, capacity: int) -> Any:
        return self.budget.wrap(super().new_slot(capacity))


def test_out_of_blocks_makes_the_newest_wait_and_every_reply_stays_the_same(engine: Engine) -> None:
    budget = BlockBudget(block=8, total=10)   # four sequences of up to 8 + 24 tokens would need 16 blocks
    runner = TightRunner(engine.model, budget)
    s = scheduler(engine, runner)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    reqs = [request(engine, runner, prompt(8, 40 + i), params, owned=True) for i in range(4)]
    want = [[e.token_id for e in engine.generate(r.todo, params)] for r in reqs]
    for r in reqs:
        s.submit(r)
    run_all(s)
    assert [tokens(r) for r in reqs] == want
    assert budget.peak <= budget.total
    assert budget.resets > 4   # besides the four releases at the end, some sequence gave its memory back


def test_a_prompt_still_prefilling_gives_its_memory_back_first(engine: Engine) -> None:
    budget = BlockBudget(block=8, total=9)
    runner = TightRunner(engine.model, budget)
    s = scheduler(engine, runner)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    old = [request(engine, runner, prompt(8, 60 + i), params, owned=True) for i in range(2)]
    new = request(engine, runner, prompt(40, 62), SamplingParams(max_new_tokens=4, ignore_eos=True), chunk=8,
                  owned=True)
    want = [[e.token_id for e in engine.generate(r.todo, r.reply.sampler.params)] for r in (*old, new)]
    for r in old:
        s.submit(r)
    s.step()
    s.step()
    s.submit(new)
    held = []
    while s.step():
        held.append(budget.held.get(id(new.slot), 0))
    assert [tokens(r) for r in (*old, new)] == want
    assert held[-1] == 0   # released at its end; before that, it gave its blocks back mid-prompt and ran again:
    assert any(a > 0 and b == 0 for a, b in zip(held[:-2], held[1:-1], strict=True))
    assert budget.peak <= budget.total


def test_a_sequence_that_can_never_fit_fails_alone(engine: Engine) -> None:
    budget = BlockBudget(block=8, total=3)
    runner = TightRunner(engine.model, budget)
    s = scheduler(engine, runner)
    big = request(engine, runner, prompt(40, 50), SamplingParams(max_new_tokens=4), owned=True)
    s.submit(big)
    run_all(s)
    item = big.events.get()
    assert isinstance(item, Failure) and isinstance(item.exc, OutOfBlocks)
    small = request(engine, runner, prompt(4, 51), SamplingParams(max_new_tokens=4, ignore_eos=True), owned=True)
    s.submit(small)
    run_all(s)
    assert len(tokens(small)) == 4


def test_the_step_lock_lets_a_waiting_thread_in_first() -> None:
    """After a step the step thread releases its lock and lets in every thread already waiting for it
    (``let_in``) before it takes the lock again: when let_in returns, the waiter holds the lock."""
    import threading

    from chatcore.batch.scheduler import StepLock

    lock = StepLock()
    held, go_on = threading.Event(), threading.Event()

    def waiter() -> None:
        with lock:
            held.set()
            go_on.wait(10)
    lock.acquire()
    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while lock._waiting == 0 and time.monotonic() < deadline:   # the waiter is blocked on the lock
        time.sleep(0.001)
    lock.release()
    lock.let_in(timeout=10)
    took = lock.acquire(blocking=False)
    if took:
        lock.release()
    go_on.set()
    assert not took   # the waiter had it
    t.join(10)
    assert held.is_set() and lock.acquire(blocking=False)
    lock.release()
    lock.let_in(timeout=0)   # nobody waiting: returns at once
