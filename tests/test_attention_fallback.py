"""Every attention backend computes the same function as the plain-math reference."""

from __future__ import annotations

import pytest
import torch

from chatcore.layers.attention import attend_chunk, pick_backend


def qkv(t: int, s: int, hq: int, hkv: int, d: int, dtype: torch.dtype, device: str, seed: int):  # noqa: ANN201
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(t, hq, d, generator=g, device=device).to(dtype)
    k = torch.randn(hkv, s, d, generator=g, device=device).to(dtype)
    v = torch.randn(hkv, s, d, generator=g, device=device).to(dtype)
    return q, k, v


CASES = [  # (new tokens T, cached before, query heads, kv heads, head dim)
    (1, 0, 4, 4, 16), (1, 37, 8, 2, 64), (17, 0, 6, 3, 32), (9, 50, 8, 1, 64), (64, 129, 4, 2, 128),
]


@pytest.mark.parametrize("case", CASES)
def test_torch_matches_math(case: tuple[int, int, int, int, int]) -> None:
    t, before, hq, hkv, d = case
    q, k, v = qkv(t, before + t, hq, hkv, d, torch.float32, "cpu", seed=sum(case))
    ref = attend_chunk(q, k, v, start=before, backend="math")
    out = attend_chunk(q, k, v, start=before, backend="torch")
    assert out.shape == (t, hq, d)
    assert (out - ref).abs().max().item() < 1e-5


def test_auto_backend_on_cpu_is_torch() -> None:
    assert pick_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'flash' needs a CUDA device"):
            pick_backend("flash", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="unknown attention backend"):
        pick_backend("nope", torch.device("cpu"), torch.float32)


# real shapes on the GPU: whole prompts (cuDNN's SDPA kernel where it takes them), a turn on a long cache
GPU_CASES = [*CASES, (2048, 0, 32, 8, 128), (1500, 0, 32, 8, 64), (1024, 0, 16, 16, 128), (256, 4000, 32, 8, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "flash", "triton"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_backends_match_reference(backend: str, case: tuple[int, int, int, int, int]) -> None:
    pytest.importorskip({"torch": "torch", "flash": "flash_attn", "triton": "triton"}[backend])
    t, before, hq, hkv, d = case
    q, k, v = qkv(t, before + t, hq, hkv, d, torch.bfloat16, "cuda", seed=sum(case))
    ref = attend_chunk(q.double(), k.double(), v.double(), start=before, backend="math")
    out = attend_chunk(q, k, v, start=before, backend=backend).double()
    assert torch.linalg.norm(out - ref) / torch.linalg.norm(ref) < 1e-2
