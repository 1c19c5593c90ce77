"""The prompt chunk on a GPU follows free memory: 32k tokens where they fit, fewer on a small or busy GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import chatcore
from chatcore.runtime import activation_bytes_per_token, fit_chunk


def test_activation_estimate_covers_the_measured_peak() -> None:
    # Llama-3.1-8B in bf16: 4.38 GiB above weights and cache for a 32k chunk on the H100 (bench/README.md)
    per_token = activation_bytes_per_token(4096, 14336, torch.bfloat16)
    assert 4.38 * 2**30 / 32768 <= per_token <= 1.15 * 4.38 * 2**30 / 32768


@pytest.mark.parametrize(("budget_tokens", "want"), [(10**9, 32768), (32768, 32768), (32767, 16384),
                                                     (5000, 4096), (600, 512), (10, 512)])
def test_fit_chunk_takes_the_largest_power_of_two_that_fits(budget_tokens: int, want: int) -> None:
    assert fit_chunk(32768, budget_tokens * 100, 100) == want


def test_an_explicit_chunk_is_kept_and_the_cpu_default_is_fixed(tiny_llama_dir: Path) -> None:
    engine = chatcore.load(tiny_llama_dir, device="cpu", dtype="float32", progress=lambda *_: None)
    assert not engine.runtime.chunk_by_memory and engine.prefill_chunk_size() == 512
    engine = chatcore.load(tiny_llama_dir, device="cpu", dtype="float32", prefill_chunk=96, progress=lambda *_: None)
    assert engine.prefill_chunk_size() == 96


@pytest.mark.gpu
def test_gpu_default_chunk_follows_free_memory(tiny_llama_dir: Path) -> None:
    engine = chatcore.load(tiny_llama_dir, device="cuda", dtype="bfloat16", progress=lambda *_: None)
    assert engine.runtime.chunk_by_memory and engine.prefill_chunk_size() == 32768   # a tiny model: 32k fits easily
    pinned = chatcore.load(tiny_llama_dir, device="cuda", dtype="bfloat16", prefill_chunk=1000,
                           progress=lambda *_: None)
    assert not pinned.runtime.chunk_by_memory and pinned.prefill_chunk_size() == 1000
