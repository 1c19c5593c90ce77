"""GPU decode: every backend's static-cache decode in bf16 against a float64 reference, and CUDA-graph
generation against eager generation and transformers (marked gpu: run on the GPU machine, skipped in CI)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import chatcore
from chatcore import cuda_graph
from chatcore.layers.attention import attend_decode

pytestmark = pytest.mark.gpu
BACKENDS = ["flash", "triton", "torch"]
_PKG = {"flash": "flash_attn", "triton": "triton", "torch": "torch"}


def _rotate64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [  # (Hq, Hkv, D, capacity, position, window, alibi)
    (32, 8, 128, 8192, 5000, None, False), (32, 8, 128, 8192, 0, None, False), (16, 16, 64, 4096, 3000, None, True),
    (32, 8, 128, 8192, 7000, 1024, False), (28, 4, 128, 33000, 32768, None, False), (12, 2, 64, 600, 77, 32, True),
])
def test_static_decode_bf16_matches_float64(backend: str, case: tuple) -> None:
    pytest.importorskip(_PKG[backend])
    hq, hkv, d, cap, pos, window, alibi = case
    g = torch.Generator(device="cuda").manual_seed(hash(case) % 2**31)   # fresh inputs per case

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cuda").bfloat16()

    q, k, v = rnd(1, hq, d), rnd(1, hkv, d), rnd(1, hkv, d)
    kc, vc = rnd(hkv, cap, d), rnd(hkv, cap, d)
    if backend != "torch":   # poison every row past the position: nothing there may be read
        kc[:, pos + 1 :], vc[:, pos + 1 :] = float("nan"), float("nan")
    angles = torch.arange(cap, device="cuda", dtype=torch.float64)[:, None] * (
        10000.0 ** (-torch.arange(0, d, 2, device="cuda", dtype=torch.float64) / d))[None, :]
    cos64, sin64 = angles.cos(), angles.sin()
    tables = (cos64.bfloat16(), sin64.bfloat16()) if backend == "flash" else (cos64.float(), sin64.float())
    slopes = (torch.rand(hq, generator=g, device="cuda") * 0.5) if alibi else None
    kc0, vc0 = kc.double(), vc.double()
    out = attend_decode(q.clone(), kc, vc, pos=torch.tensor([pos], dtype=torch.int32, device="cuda"),
                        backend=backend, sliding_window=window, alibi=slopes, new_kv=(k, v), rotary=tables)
    assert torch.isfinite(out).all()
    c, s = cos64[pos][None, None], sin64[pos][None, None]
    qr, kr = _rotate64(q.double(), c, s)[0], _rotate64(k.double(), c, s)[0]
    kc0[:, pos], vc0[:, pos] = kr, v[0].double()
    assert torch.linalg.norm(kc[:, pos].double() - kr) / torch.linalg.norm(kr) < 1e-2   # the append
    rep = hq // hkv
    keys, vals = kc0[:, : pos + 1].repeat_interleave(rep, 0), vc0[:, : pos + 1].repeat_interleave(rep, 0)
    scores = torch.einsum("hd,hsd->hs", qr, keys) / math.sqrt(d)
    j = torch.arange(pos + 1, device="cuda")
    if slopes is not None:
        scores = scores + slopes.double()[:, None] * (j - pos)[None, :]
    if window is not None:
        scores = scores.masked_fill((j <= pos - window)[None, :], float("-inf"))
    ref = torch.einsum("hs,hsd->hd", scores.softmax(-1), vals)
    assert (torch.linalg.norm(out[0].double() - ref) / torch.linalg.norm(ref)).item() < 1e-2


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_graph_decode_float32_matches_transformers(decode_family_dir: Path, backend: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """float32: CUDA-graph generation is token-exact with transformers' greedy generate (the torch backend
    crossing from one span's graph to the next at 128 tokens, the triton backend in one graph)."""
    pytest.importorskip(_PKG[backend])
    monkeypatch.setattr(cuda_graph, "MIN_SPAN", 128)
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    ref = AutoModelForCausalLM.from_pretrained(decode_family_dir, dtype=torch.float32, attn_implementation="eager")
    ref = ref.to("cuda").eval()
    prompt = _ids(100, 1)
    with torch.inference_mode():
        expected = ref.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=40, min_new_tokens=40,
                                do_sample=False, pad_token_id=0)[0, 100:].tolist()
    engine = chatcore.load(decode_family_dir, device="cuda", dtype="float32", attention=backend, max_seq_len=256,
                           progress=lambda *_: None)
    slot = engine.new_slot()
    params = chatcore.SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    assert [ev.token_id for ev in engine.generate(prompt, params, slot=slot)] == expected
    assert slot.decode_graph is not None                       # the graph served the decode steps
    # a second turn on the same slot: the prefix is reused and the same graph replays at new lengths
    turn2 = prompt + expected + _ids(20, 2)
    with torch.inference_mode():
        expected2 = ref.generate(torch.tensor([turn2], device="cuda"), max_new_tokens=30, min_new_tokens=30,
                                 do_sample=False, pad_token_id=0)[0, len(turn2):].tolist()
    graph = slot.decode_graph
    assert sorted(graph.graphs) == ([128, 256] if backend == "torch" else [256])
    events = list(engine.generate(turn2, params.replace(max_new_tokens=30), slot=slot))
    assert [ev.token_id for ev in events] == expected2
    assert slot.decode_graph is graph and events[-1].stats.cached_tokens >= 139


@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_and_eager_bf16_agree(decode_family_dir: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 decode with and without graphs stays close to float32; the flash and torch graphs cross from a
    160-row span to a 320-row one on the way."""
    pytest.importorskip(_PKG[backend])
    monkeypatch.setattr(cuda_graph, "MIN_SPAN", 160)
    graphed = chatcore.load(decode_family_dir, device="cuda", dtype="bfloat16", attention=backend, max_seq_len=512,
                            progress=lambda *_: None)
    eager = chatcore.load(decode_family_dir, device="cuda", dtype="bfloat16", attention=backend, max_seq_len=512,
                          cuda_graphs=False, progress=lambda *_: None)
    ref = chatcore.load(decode_family_dir, device="cuda", dtype="float32", attention="torch", max_seq_len=512,
                        cuda_graphs=False, progress=lambda *_: None)
    prompt = _ids(150, 3)
    params = chatcore.SamplingParams(temperature=0.0, max_new_tokens=60, ignore_eos=True)
    for engine in (graphed, eager):
        slot = engine.new_slot()
        tokens = [ev.token_id for ev in engine.generate(prompt, params, slot=slot)]
        if engine is graphed:
            assert sorted(slot.decode_graph.graphs) == ([512] if backend == "triton" else [160, 320])
        seq = prompt + tokens
        want, got = ref.logits(seq), engine.logits(seq)
        err = got - want
        assert (torch.linalg.norm(err) / torch.linalg.norm(want)).item() < 2e-2
        # greedy in bf16 may part from float32 at a near-tie, never at a clear choice: every token it picked
        # is within a few times the bf16 logit error of the float32 reference's best
        rows = want[len(prompt) - 1 : -1]
        gap = rows.max(-1).values - rows[torch.arange(len(tokens)), torch.tensor(tokens)]
        assert gap.max().item() <= 4 * err.abs().max().item(), (gap.max().item(), err.abs().max().item())


def test_sink_window_stream_runs_through_the_graph(tiny_llama_dir: Path) -> None:
    """A stream longer than the window: the graph keeps replaying across context shifts."""
    engine = chatcore.load(tiny_llama_dir, device="cuda", dtype="float32", max_seq_len=128, attention="torch",
                           progress=lambda *_: None)
    plain = chatcore.load(tiny_llama_dir, device="cuda", dtype="float32", max_seq_len=128, attention="torch",
                          cuda_graphs=False, progress=lambda *_: None)
    params = chatcore.SamplingParams(temperature=0.0, max_new_tokens=300, ignore_eos=True)
    a = [ev.token_id for ev in engine.generate(_ids(60, 4), params, sink_tokens=4)]
    b = [ev.token_id for ev in plain.generate(_ids(60, 4), params, sink_tokens=4)]
    assert len(a) == 300 and a == b


@pytest.mark.parametrize("bias", [False, True])
def test_gate_up_silu_gemv_bf16_at_the_1b_shape(bias: bool) -> None:
    """The fused gate/up GEMV with the SiLU epilogue (every rows-per-program it may pick), the dispatcher, and
    both with the RMSNorm prologue."""
    pytest.importorskip("triton")
    from chatcore.layers.activation import _BLOCKS, _FUSED_CHOICE, gate_up_silu
    from chatcore.layers.triton_gemv import gemv_gate_up_silu

    g = torch.Generator(device="cuda").manual_seed(9)
    n, k = 8192, 2048
    x = torch.randn(1, k, generator=g, device="cuda").bfloat16()
    w = (torch.randn(2 * n, k, generator=g, device="cuda") / k**0.5).bfloat16()
    b = torch.randn(2 * n, generator=g, device="cuda").bfloat16() if bias else None
    gu = x.double() @ w.double().T + (0 if b is None else b.double())
    want = torch.nn.functional.silu(gu[:, :n]) * gu[:, n:]
    for block in _BLOCKS:
        out = gemv_gate_up_silu(x, w, b, block)
        assert (torch.linalg.norm(out.double() - want) / torch.linalg.norm(want)).item() < 1e-2
    out = gate_up_silu(x, w, b)
    assert (2 * n, k, torch.bfloat16, bias) in _FUSED_CHOICE     # timed once, outside any capture
    assert (torch.linalg.norm(out.double() - want) / torch.linalg.norm(want)).item() < 1e-2
    nw = torch.rand(k, generator=g, device="cuda").bfloat16() + 0.5     # the RMSNorm before, in the prologue
    normed = x.double() / (x.double().pow(2).mean() + 1e-5).sqrt() * nw.double()
    gu = normed @ w.double().T + (0 if b is None else b.double())
    want = torch.nn.functional.silu(gu[:, :n]) * gu[:, n:]
    for out in (gemv_gate_up_silu(x, w, b, norm=(nw, 1e-5)), gate_up_silu(x, w, b, norm=(nw, 1e-5))):
        assert (torch.linalg.norm(out.double() - want) / torch.linalg.norm(want)).item() < 1e-2


def test_gemv_prologue_and_epilogue_bf16_at_the_1b_shapes() -> None:
    """qkv with the RMSNorm in the prologue, down with the residual add in the epilogue, against float64."""
    pytest.importorskip("triton")
    from chatcore.layers.triton_gemv import gemv

    g = torch.Generator(device="cuda").manual_seed(10)
    for n, k in ((3072, 2048), (2048, 8192)):
        x = torch.randn(1, k, generator=g, device="cuda").bfloat16()
        w = (torch.randn(n, k, generator=g, device="cuda") / k**0.5).bfloat16()
        nw = torch.rand(k, generator=g, device="cuda").bfloat16() + 0.5
        res = torch.randn(1, n, generator=g, device="cuda").bfloat16()
        normed = x.double() / (x.double().pow(2).mean() + 1e-5).sqrt() * nw.double()
        want = res.double() + normed @ w.double().T
        out = gemv(x, w, norm=(nw, 1e-5), residual=res)
        assert (torch.linalg.norm(out.double() - want) / torch.linalg.norm(want)).item() < 1e-2


@pytest.mark.parametrize("fused", [True, False])
def test_graph_decode_bf16_with_and_without_the_fused_gate_up(tiny_llama_dir: Path, fused: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Both MLP paths the timing may choose serve a captured bf16 decode that agrees with float32."""
    pytest.importorskip("triton")
    from chatcore.layers import activation

    engine = chatcore.load(tiny_llama_dir, device="cuda", dtype="bfloat16", attention="triton", max_seq_len=256,
                           progress=lambda *_: None)
    ref = chatcore.load(tiny_llama_dir, device="cuda", dtype="float32", attention="torch", max_seq_len=256,
                        cuda_graphs=False, progress=lambda *_: None)
    w = engine.model.layers[0].w_gate_up
    monkeypatch.setitem(activation._FUSED_CHOICE, (w.shape[0], w.shape[1], w.dtype, False), 4 if fused else 0)
    prompt = _ids(80, 5)
    tokens = [ev.token_id for ev in engine.generate(prompt, chatcore.SamplingParams(temperature=0.0,
                                                                                   max_new_tokens=30,
                                                                                   ignore_eos=True))]
    want = ref.logits(prompt + tokens)
    err = engine.logits(prompt + tokens) - want
    assert (torch.linalg.norm(err) / torch.linalg.norm(want)).item() < 2e-2
    rows = want[len(prompt) - 1 : -1]   # each token the graph picked is (near) float32's best, as above
    gap = rows.max(-1).values - rows[torch.arange(len(tokens)), torch.tensor(tokens)]
    assert gap.max().item() <= 4 * err.abs().max().item()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_top_logprobs_through_the_graph_equal_eager(tiny_llama_dir: Path, temperature: float) -> None:
    """float32: the CUDA-graph loop's top logprobs (packed with the token, one pinned fetch a step) are the eager
    loop's: the same tokens (seeded sampling too), the same top ids, logprobs to float rounding."""
    kw = dict(device="cuda", dtype="float32", max_seq_len=256, attention="triton", progress=lambda *_: None)
    graphed, eager = chatcore.load(tiny_llama_dir, **kw), chatcore.load(tiny_llama_dir, cuda_graphs=False, **kw)
    params = chatcore.SamplingParams(temperature=temperature, seed=3, max_new_tokens=40, ignore_eos=True,
                                     top_logprobs=5)
    runs = []
    for engine in (graphed, eager):
        slot = engine.new_slot()
        runs.append(list(engine.generate(_ids(30, 6), params, slot=slot)))
        if engine is graphed:
            assert slot.decode_graph is not None
    a, b = runs
    assert [e.token_id for e in a] == [e.token_id for e in b] and len(a) == 40
    for x, y in zip(a, b, strict=True):
        assert [t for t, _ in x.top_logprobs] == [t for t, _ in y.top_logprobs]
        assert [lp for _, lp in x.top_logprobs] == pytest.approx([lp for _, lp in y.top_logprobs], abs=1e-4)
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
