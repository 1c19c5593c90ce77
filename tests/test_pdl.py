"""Programmatic dependent launch (chatcore/layers/pdl.py): the decode step's Triton kernels give the same bits
with it as without it. GPU tests (sm_90+) run on the GPU machine; the CPU never launches with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import chatcore
from chatcore.layers import pdl


def test_the_cpu_and_the_interpreter_never_launch_with_pdl() -> None:
    assert not pdl.uses_pdl(torch.device("cpu"))
    assert pdl.launch_options(False) == {}
    assert pdl.launch_options(True) == {"launch_pdl": True}


def _needs_hopper() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a CUDA GPU of compute capability 9.0 or more")


@pytest.mark.gpu
def test_kernels_give_the_same_bits_with_and_without_pdl(monkeypatch: pytest.MonkeyPatch) -> None:
    _needs_hopper()
    from chatcore.layers.triton_decode import decode_attention
    from chatcore.layers.triton_gemv import gemv, gemv_gate_up_silu

    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cuda").bfloat16()

    x, w, wgu, res, nw = rnd(1, 2048), rnd(3072, 2048), rnd(2 * 4096, 2048), rnd(1, 3072), rnd(2048)
    q, kc, vc = rnd(32, 128), rnd(8, 4096, 128), rnd(8, 4096, 128)
    pos = torch.tensor([3000], dtype=torch.int32, device="cuda")

    def run() -> list[torch.Tensor]:
        return [gemv(x, w, norm=(nw, 1e-5), residual=res), gemv_gate_up_silu(x, wgu, norm=(nw, 1e-5)),
                decode_attention(q, kc, vc, pos)]

    monkeypatch.setattr(pdl, "_ENABLED", True)
    assert pdl.uses_pdl(x.device)
    with_pdl = run()
    monkeypatch.setattr(pdl, "_ENABLED", False)
    without = run()
    for a, b in zip(with_pdl, without, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_graph_decode_gives_the_same_tokens_and_logits_with_and_without_pdl(
        tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole step in a CUDA graph, kernels chained by PDL: the same greedy tokens and the same logits."""
    _needs_hopper()
    prompt = [(7 * i + 3) % 200 + 1 for i in range(90)]
    params = chatcore.SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(pdl, "_ENABLED", enabled)
        engine = chatcore.load(tiny_llama_dir, device="cuda", dtype="bfloat16", attention="triton", max_seq_len=256,
                               progress=lambda *_: None)
        slot = engine.new_slot()
        tokens = [ev.token_id for ev in engine.generate(prompt, params, slot=slot)]
        assert slot.decode_graph is not None
        step = slot.decode_graph.step(tokens[-1]).float().cpu()
        runs.append((tokens, step))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
