"""BatchDecodeGraphs off the GPU: buckets, where graphs apply, and (``capture=False``: the same static buffers and
padding, the forward run eagerly) the runner's decode-only path against eager BatchStep forwards and against
single-sequence greedy decoding. The Triton paged kernel runs under the CPU interpreter (small model, few steps);
tests/test_paged_gpu.py checks the captured graphs on the GPU."""

from __future__ import annotations

from pathlib import Path

import model_factory
import pytest
import torch
from family_check import prompt

import chatcore
from chatcore.batch.graphs import BatchDecodeGraphs, buckets, decode_graphs
from chatcore.batch.paged import PagedPool
from chatcore.batch.paged_runner import PagedRunner
from chatcore.batch.runner import SerialRunner, Work
from chatcore.batch.step import BatchStep

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_factory.make_llama_dir(tmp_path_factory.mktemp("graphs-llama"), seed=22)


def test_buckets() -> None:
    assert buckets(1) == [1]
    assert buckets(32) == [1, 2, 4, 8, 16, 32]
    assert buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    with pytest.raises(ValueError, match="positive"):
        buckets(0)


def test_no_graphs_off_cuda_or_on_host_backends(llama_dir: Path) -> None:
    engine = chatcore.load(llama_dir, device="cpu", dtype="float32", attention="torch", progress=lambda *_: None)
    pool = PagedPool.for_model(engine.model, num_blocks=8, block_size=16)
    assert decode_graphs(engine.model, pool) is None
    assert PagedRunner(engine.model, pool).graphs is None
    with pytest.raises(ValueError, match="CUDA pool"):
        BatchDecodeGraphs(engine.model, pool, 4)
    with pytest.raises(ValueError, match="reads lengths on the host"):
        BatchDecodeGraphs(engine.model, pool, 4, capture=False)


def test_decode_path_pads_and_equals_eager_and_serial(llama_dir: Path) -> None:
    pytest.importorskip("triton")
    engine = chatcore.load(llama_dir, device="cpu", dtype="float32", attention="triton", max_seq_len=128,
                           progress=lambda *_: None)
    model = engine.model
    pool = PagedPool.for_model(model, num_blocks=24, block_size=16)
    runner = PagedRunner(model, pool)
    graphs = runner.graphs = BatchDecodeGraphs(model, pool, 4, capture=False)
    assert graphs.width == 8 and graphs.buckets == [1, 2, 4]
    serial = SerialRunner(model)
    prompts = [prompt(n, seed=40 + n) for n in (5, 18, 33, 12)]
    ps, ss = [runner.new_slot(128) for _ in prompts], [serial.new_slot(128) for _ in prompts]
    lp = runner.run([Work(s, p) for s, p in zip(ps, prompts, strict=True)])
    ls = serial.run([Work(s, p) for s, p in zip(ss, prompts, strict=True)])
    pool.k[:, 0] = float("nan")    # the scratch block: padding writes its row 0, nothing live may read it
    pool.v[:, 0] = float("nan")
    for step in range(5):
        want = ls.argmax(-1).tolist()
        assert lp.argmax(-1).tolist() == want, f"step {step}"
        torch.testing.assert_close(lp, ls, atol=1e-4, rtol=1e-4)
        # 4 and 3 live rows in bucket 4: row 3 turns to padding after being live (its table must not stay)
        live = 3 if step % 2 else 4
        with torch.inference_mode():
            for s in ps[:live]:
                s.reserve(1)
            eager = model.run(torch.tensor(want[:live]), BatchStep(pool, ps[:live], [1] * live, "triton")).float()
        lp = runner.run([Work(s, [t]) for s, t in zip(ps[:live], want[:live], strict=True)])   # the graph path
        torch.testing.assert_close(lp, eager, atol=1e-5, rtol=1e-5)
        ls = serial.run([Work(s, [t]) for s, t in zip(ss[:live], want[:live], strict=True)])
        if live < 4:   # the fourth decodes alone: bucket 1
            lp = torch.cat([lp, runner.run([Work(ps[3], [want[3]])])])
            ls = torch.cat([ls, serial.run([Work(ss[3], [want[3]])])])
    assert sorted(graphs.graphs) == [1, 4]
    assert [s.length for s in ps] == [s.length for s in ss]
    # a greedy step (the scheduler's queued-ahead path): tokens fed from a device tensor, the argmax returned,
    # nothing committed; equal to the host-token step's logits' argmax
    want = ls.argmax(-1)
    for s in ps:
        s.reserve(1)
    ahead = runner.greedy_step(ps, want)
    assert [s.length for s in ps] == [s.length for s in ss]   # nothing committed
    lp = runner.run([Work(s, [t]) for s, t in zip(ps, want.tolist(), strict=True)])
    assert ahead.dtype == torch.long and ahead.tolist() == lp.argmax(-1).tolist()
    with pytest.raises(ValueError, match="1 .. 4 sequences"):
        graphs.bucket(5)


def test_paged_runner_on_the_triton_backend(tmp_path: Path) -> None:
    """BLOOM (ALiBi; its queries a view of the fused q/k/v projection) through the Triton paged kernel under the
    interpreter: the paged runner's schedule (chunks, decode rows, a truncation, a sink drop, a shared prefix)
    equals the serial runner's."""
    pytest.importorskip("triton")
    from model_factory import randomize_biases
    from test_paged_runner import _check_equal

    path = randomize_biases(model_factory.make_bloom_dir(tmp_path / "bloom", seed=3))
    engine = chatcore.load(path, device="cpu", dtype="float32", attention="triton", progress=lambda *_: None)
    _check_equal(engine, PagedPool.for_model(engine.model, num_blocks=40, block_size=16))
