"""The engine on a CUDA GPU: float32 against transformers, and the bf16 backends against each other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import chatcore

pytestmark = pytest.mark.gpu


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_float32_on_gpu_matches_transformers(tiny_llama_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    ref = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="eager")
    ref = ref.to("cuda").eval()
    engine = chatcore.load(tiny_llama_dir, device="cuda", dtype="float32", prefill_chunk=64)
    prompt = ids(200, 1)
    with torch.inference_mode():
        theirs = ref(torch.tensor([prompt], device="cuda")).logits[0].float().cpu()
        expected = ref.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=32, min_new_tokens=32,
                                do_sample=False, pad_token_id=0)[0, 200:].tolist()
    assert (engine.logits(prompt) - theirs).abs().max().item() <= 1e-4
    params = chatcore.SamplingParams(max_new_tokens=32, ignore_eos=True)
    assert [ev.token_id for ev in engine.generate(prompt, params)] == expected


@pytest.mark.parametrize("backend", ["torch", "flash"])
def test_bf16_backends_match_float32(tiny_llama_dir: Path, backend: str) -> None:
    if backend == "flash":
        pytest.importorskip("flash_attn")
    ref = chatcore.load(tiny_llama_dir, device="cuda", dtype="float32")
    engine = chatcore.load(tiny_llama_dir, device="cuda", dtype="bfloat16", attention=backend, prefill_chunk=48)
    assert engine.runtime.attention_backend == backend
    prompt = ids(300, 2)
    want, got = ref.logits(prompt), engine.logits(prompt)
    assert (torch.linalg.norm(got - want) / torch.linalg.norm(want)).item() < 2e-2
    slot = engine.new_slot()
    params = chatcore.SamplingParams(max_new_tokens=40, ignore_eos=True)
    first = [ev.token_id for ev in engine.generate(prompt, params, slot=slot)]
    gen = engine.generate(prompt, params, slot=slot)   # served from the cache
    again = [ev.token_id for ev in gen]
    assert gen.stats.cached_tokens == len(prompt) - 1 and gen.stats.prefill_tokens == 1
    # bf16 greedy runs may part only at a near tie: where they first differ, the float32 model must rate both
    # tokens within bf16's rounding of each other (a cache that served wrong keys differs by far more)
    i = next((j for j, (a, b) in enumerate(zip(first, again, strict=True)) if a != b), None)
    if i is not None:
        logits = ref.logits(prompt + first[:i])[-1]
        gap = (logits[first[i]] - logits[again[i]]).abs().item()
        assert gap < 2e-2 * logits.abs().max().item(), f"step {i}: {first[i]} vs {again[i]}, gap {gap:.4f}"


def test_sink_window_on_gpu(tiny_llama_dir: Path) -> None:
    engine = chatcore.load(tiny_llama_dir, device="cuda", dtype="bfloat16")
    slot = engine.new_slot(capacity=128)
    params = chatcore.SamplingParams(max_new_tokens=600, ignore_eos=True, temperature=1.0, seed=3)
    events = list(engine.generate(ids(50, 3), params, slot=slot, sink_tokens=4))
    assert len(events) == 600 and slot.length <= 128 and slot.allocated == 128
