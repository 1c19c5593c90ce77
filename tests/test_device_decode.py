"""The device-position decode step (what a CUDA graph captures) computes what the eager step computes.

For every family and every backend that runs here, a prompt is prefilled into two slots; one decodes
with ``model.forward`` (positions on the host), the other with ``model.decode`` (position in a device
tensor, static cache, attending over a span of it that just holds the position). Logits must agree to
float32 rounding and greedy tokens exactly, through a sliding window, ALiBi, and a context shift (sink
tokens kept, the oldest others dropped).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import chatcore


@pytest.mark.parametrize("backend", ["torch", "math", "triton"])
def test_device_step_matches_eager_step(decode_family_dir: Path, backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    engine = chatcore.load(decode_family_dir, device="cpu", dtype="float32", attention=backend, max_seq_len=96,
                           prefill_chunk=16, progress=lambda *_: None)
    model = engine.model
    prompt = torch.randint(2, 300, (50,), generator=torch.Generator().manual_seed(5)).tolist()
    eager, static = model.new_slot(96), model.new_slot(96, preallocate=True)
    le, ls = engine.prefill(prompt, eager)[-1], engine.prefill(prompt, static)[-1]
    pos = torch.zeros(1, dtype=torch.int32)
    token_in = torch.zeros(1, dtype=torch.long)
    tokens_e, tokens_s = [], []
    steps = 8 if backend == "triton" else 40     # Triton's CPU interpreter is slow; the GPU run does more
    for step in range(steps):
        if step == steps - 4:   # context shift on both slots: keep 4 sink tokens, drop the 30 after them
            eager.drop(4, 34)
            static.drop(4, 34)
        te, ts = int(le.argmax()), int(ls.argmax())
        tokens_e.append(te)
        tokens_s.append(ts)
        with torch.inference_mode():
            le = model.forward(torch.tensor([te]), eager)[-1]
            eager.commit([te])
            token_in.fill_(ts)
            pos.fill_(static.length)
            span = min(96, static.length // 16 * 16 + 16)   # a span of the cache just holding the position
            ls = model.decode(token_in, pos, static, span)[-1]
            static.commit([ts])
        assert (le - ls).abs().max().item() < 1e-4, f"step {step}"
    assert tokens_e == tokens_s
    assert torch.equal(eager.k[:, :, : eager.length], static.k[:, :, : static.length]) or \
        (eager.k[:, :, : eager.length] - static.k[:, :, : static.length]).abs().max().item() < 1e-5


def test_device_step_needs_a_preallocated_cache(tiny_llama_dir: Path) -> None:
    engine = chatcore.load(tiny_llama_dir, device="cpu", dtype="float32", progress=lambda *_: None)
    with pytest.raises(ValueError, match="full capacity"):
        engine.model.decode(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.int32),
                            engine.model.new_slot(64))
