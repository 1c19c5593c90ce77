"""Paged attention's GPU paths (compiled Triton kernel, flash-attn entries) and the batched decode CUDA graphs.

On the GPU machine: ``python -m pytest tests/test_paged_gpu.py -q`` (about half a minute); skipped without a
GPU (tests/test_batch_graphs.py checks the graphs' buffers and padding on the CPU). References: attend_paged's
math backend in float32 (kernels); eager BatchStep forwards and single-sequence greedy decoding (graphs).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import model_factory
import pytest
import torch
from family_check import prompt

import chatcore
from chatcore.batch.graphs import BatchDecodeGraphs
from chatcore.batch.paged import PagedPool
from chatcore.batch.paged_runner import PagedRunner
from chatcore.batch.runner import SerialRunner, Work
from chatcore.batch.step import BatchStep
from chatcore.layers import flash_paged
from chatcore.layers.kv_quant import quantize
from chatcore.layers.paged_attention import attend_paged

gpu = pytest.mark.gpu
HAVE_FLASH = importlib.util.find_spec("flash_attn") is not None
needs_flash = pytest.mark.skipif(not HAVE_FLASH, reason="needs flash-attn")


def _pool(lens: list[int], q_lens: list[int], *, hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype,
          code: torch.dtype | None = None, seed: int = 0) -> dict:
    """A CUDA pool with shuffled blocks per sequence (block 0 scratch) and the attend_paged arguments."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    nb = 1 + sum(need) + 1
    order = (torch.randperm(nb - 1, generator=g) + 1).tolist()
    width = max(need) + 1
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor([order.pop() for _ in range(n)])
    k = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
    v = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = dict(q=q.cuda(), k=k.cuda(), v=v.cuda(), scales=None,
               args=dict(cu_q=cu.cuda(), seq_lens=torch.tensor(lens, dtype=torch.int32).cuda(),
                         block_tables=tables.cuda(), max_q=max(q_lens)))
    if code is not None:
        (kc, ks), (vc, vs) = quantize(out["k"], code), quantize(out["v"], code)
        out.update(k=kc, v=vc, scales=(ks, vs))
    return out


def _math(c: dict, **opts: object) -> torch.Tensor:
    """The float32 math backend on the same pool (codes stay codes: the backend dequantizes them)."""
    k, v = (c["k"], c["v"]) if c["scales"] is not None else (c["k"].float(), c["v"].float())
    return attend_paged(c["q"].float(), k, v, backend="math", scales=c["scales"], **c["args"], **opts)


OPTIONS = {"plain": {}, "window": {"sliding_window": 100}, "alibi": {"alibi": torch.rand(8) + 0.01},
           "window_sinks": {"sliding_window": 100, "sinks": 4}}
MIXED = ([700, 1, 300, 513], [1, 1, 37, 200])     # decode rows, a chunk on a cache, a whole prompt
DECODE = ([700, 1, 300, 513, 256], [1, 1, 1, 1, 1])


@gpu
@pytest.mark.parametrize(("option", "batch", "bs"), [
    *[(o, "decode", 256) for o in sorted(OPTIONS)], ("plain", "decode", 16), ("plain", "mixed", 16),
    *[(o, "mixed", 256) for o in ("window", "alibi", "window_sinks")]])
def test_triton_backend_compiled_bf16(option: str, batch: str, bs: int) -> None:
    lens, q_lens = DECODE if batch == "decode" else MIXED
    c = _pool(lens, q_lens, hq=8, hkv=2, d=128, bs=bs, dtype=torch.bfloat16, seed=bs + len(option))
    opts = {k: (x.cuda() if isinstance(x, torch.Tensor) else x) for k, x in OPTIONS[option].items()}
    got = attend_paged(c["q"], c["k"], c["v"], backend="triton", scales=c["scales"], **c["args"], **opts)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _math(c, **opts), atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("code", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("batch", ["decode", "mixed"])
def test_triton_backend_reads_codes_and_scales(code: torch.dtype, batch: str) -> None:
    lens, q_lens = DECODE if batch == "decode" else MIXED
    c = _pool(lens, q_lens, hq=8, hkv=2, d=64, bs=256, dtype=torch.bfloat16, code=code, seed=3)
    got = attend_paged(c["q"], c["k"], c["v"], backend="triton", scales=c["scales"], sliding_window=200, sinks=2,
                       **c["args"])
    torch.testing.assert_close(got.float(), _math(c, sliding_window=200, sinks=2), atol=2e-2, rtol=2e-2)


@gpu
@needs_flash
@pytest.mark.parametrize("option", ["plain", "window", "alibi"])
@pytest.mark.parametrize("batch", ["decode", "mixed"])
def test_flash_backend_runs_flash_attn(option: str, batch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lens, q_lens = DECODE if batch == "decode" else MIXED
    c = _pool(lens, q_lens, hq=8, hkv=2, d=128, bs=256, dtype=torch.bfloat16, seed=7)
    opts = {k: (x.cuda() if isinstance(x, torch.Tensor) else x) for k, x in OPTIONS[option].items()}

    def no_fallback(*a: object, **kw: object) -> None:
        raise AssertionError("the flash backend fell back to triton")

    monkeypatch.setattr(flash_paged, "attend_triton", no_fallback)
    got = attend_paged(c["q"], c["k"], c["v"], backend="flash", **c["args"], **opts)
    torch.testing.assert_close(got.float(), _math(c, **opts), atol=2e-2, rtol=2e-2)


@gpu
def test_flash_backend_hands_what_it_cannot_run_to_triton() -> None:
    """Block size 16, a quantized pool, sinks beside a window: flash_paged.takes says no, triton runs it."""
    c = _pool(*DECODE, hq=8, hkv=2, d=64, bs=16, dtype=torch.bfloat16, seed=9)
    assert not flash_paged.takes(c["q"], c["k"], None, 0, None)
    got = attend_paged(c["q"], c["k"], c["v"], backend="flash", **c["args"])
    torch.testing.assert_close(got.float(), _math(c), atol=2e-2, rtol=2e-2)
    c = _pool(*DECODE, hq=8, hkv=2, d=64, bs=256, dtype=torch.bfloat16, seed=9)
    assert flash_paged.takes(c["q"], c["k"], None, 0, None)
    assert not flash_paged.takes(c["q"], c["k"], 100, 4, None)
    c = _pool(*DECODE, hq=8, hkv=2, d=64, bs=256, dtype=torch.bfloat16, code=torch.int8, seed=9)
    assert not flash_paged.takes(c["q"], c["k"], None, 0, c["scales"])
    got = attend_paged(c["q"], c["k"], c["v"], backend="flash", scales=c["scales"], **c["args"])
    torch.testing.assert_close(got.float(), _math(c), atol=2e-2, rtol=2e-2)


# ---- batched decode graphs on a tiny model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_factory.make_llama_dir(tmp_path_factory.mktemp("paged-gpu-llama"), seed=21)


def _engine(path: Path, backend: str, dtype: str) -> chatcore.Engine:
    return chatcore.load(path, device="cuda", dtype=dtype, attention=backend, max_seq_len=512,
                         progress=lambda *_: None)


PROMPTS = [prompt(n, seed=30 + n) for n in (5, 17, 40, 64, 9)]


FAMILIES = {"mistral": {"sliding_window": 24}, "bloom": {}, "gemma3": {}}   # a window, ALiBi, two rotaries


@gpu
@pytest.mark.parametrize(("family", "backend", "dtype", "bs"), [
    ("llama", "triton", "float32", 16), ("llama", "triton", "bfloat16", 16),
    pytest.param("llama", "flash", "bfloat16", 256, marks=needs_flash),
    *[(f, "triton", "float32", 16) for f in FAMILIES]])
def test_graph_logits_equal_eager_batch_step(llama_dir: Path, tmp_path: Path, family: str, backend: str, dtype: str,
                                             bs: int) -> None:
    path = llama_dir if family == "llama" else \
        getattr(model_factory, f"make_{family}_dir")(tmp_path / family, seed=5, **FAMILIES[family])
    engine = _engine(path, backend, dtype)
    model = engine.model
    pool = PagedPool.for_model(model, num_blocks=64 if bs == 16 else 8, block_size=bs)
    runner = PagedRunner(model, pool)
    assert isinstance(runner.graphs, BatchDecodeGraphs)
    slots = [runner.new_slot(512) for _ in PROMPTS]
    runner.run([Work(s, p) for s, p in zip(slots, PROMPTS, strict=True)])   # prompt chunks: eager
    graphs = BatchDecodeGraphs(model, pool, 8)
    tol = 1e-4 if dtype == "float32" else 3e-2
    for n in (1, 3, 5, 2):                                # buckets 1, 4, 8 (three and five rows of padding), 2
        live = slots[:n]
        toks = [7 + b for b in range(n)]
        with torch.inference_mode():
            for s in live:
                s.reserve(1)
            eager = model.run(torch.tensor(toks, device="cuda"), BatchStep(pool, live, [1] * n, backend)).float()
            replayed = graphs.run(live, toks).float()      # writes the same keys and values again
        torch.testing.assert_close(replayed, eager, atol=tol, rtol=tol)
        for s, t in zip(live, toks, strict=True):
            s.commit([t])
    assert sorted(graphs.graphs) == [1, 2, 4, 8]


@gpu
@pytest.mark.parametrize(("backend", "bs"), [("triton", 16), pytest.param("flash", 256, marks=needs_flash)])
def test_batched_greedy_equals_single_sequence_greedy(llama_dir: Path, backend: str, bs: int) -> None:
    """16 decode steps of five sequences through the graphs (PagedRunner) == each sequence decoded alone
    (SerialRunner, eager). float32 for triton (tokens must be identical); flash runs bf16 only, so there both
    sides are bf16, teacher-forced with the serial tokens, and logits must stay close."""
    dtype = "float32" if backend == "triton" else "bfloat16"
    engine = _engine(llama_dir, backend, dtype)
    model = engine.model
    pool = PagedPool.for_model(model, num_blocks=64 if bs == 16 else 12, block_size=bs)
    runner = PagedRunner(model, pool)
    assert runner.graphs is not None
    serial = SerialRunner(model)
    ps, ss = [runner.new_slot(512) for _ in PROMPTS], [serial.new_slot(512) for _ in PROMPTS]
    lp = runner.run([Work(s, p) for s, p in zip(ps, PROMPTS, strict=True)])
    ls = serial.run([Work(s, p) for s, p in zip(ss, PROMPTS, strict=True)])
    for step in range(16):
        want = ls.argmax(-1).tolist()
        if dtype == "float32":
            assert lp.argmax(-1).tolist() == want, f"step {step}"
            torch.testing.assert_close(lp, ls, atol=1e-3, rtol=1e-3)
        else:
            torch.testing.assert_close(lp, ls, atol=5e-2, rtol=5e-2)
        live = 5 if step % 4 else 3                        # the batch shrinks and grows: buckets 4 and 8
        lp = runner.run([Work(s, [t]) for s, t in zip(ps[:live], want[:live], strict=True)])
        ls_live = serial.run([Work(s, [t]) for s, t in zip(ss[:live], want[:live], strict=True)])
        if live < 5:   # the others wait a step (they decode the same token next step, as in the paged runner)
            lp = torch.cat([lp, runner.run([Work(s, [t]) for s, t in zip(ps[live:], want[live:], strict=True)])])
            ls_live = torch.cat([ls_live, serial.run([Work(s, [t]) for s, t in zip(ss[live:], want[live:],
                                                                                   strict=True)])])
        ls = ls_live
    assert set(runner.graphs.graphs) >= {2, 4, 8}
