"""The Triton prefill kernel (FlashAttention-2 forward with ALiBi and a sliding window) against the math backend.

On machines without a GPU it runs under Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
with small tiles so that every case crosses several query and key tiles; the GPU machine runs the compiled
kernel at real shapes (the tests marked gpu).
"""

from __future__ import annotations

import pytest
import torch

import chatcore.layers.attention as attn
from chatcore.layers.alibi import bloom_slopes
from chatcore.layers.attention import attend_chunk

pytest.importorskip("triton")
triton_prefill = pytest.importorskip("chatcore.layers.triton_prefill")


def inputs(t: int, before: int, hq: int, hkv: int, d: int, dtype: torch.dtype, device: str, seed: int,
           spare: int = 0):  # noqa: ANN201
    """q [T, Hq, D] and k/v as views of a cache [Hkv, S + spare, D] (head stride = capacity * D)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(t, hq, d, generator=g, device=device).to(dtype)
    kc = torch.randn(hkv, before + t + spare, d, generator=g, device=device).to(dtype)
    vc = torch.randn(hkv, before + t + spare, d, generator=g, device=device).to(dtype)
    return q, kc, vc


def math_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, window: int | None,
                   slopes: torch.Tensor | None) -> torch.Tensor:
    """The plain-math backend, through the attention entry point."""
    return attend_chunk(q, k, v, start=start, backend="math", sliding_window=window, alibi=slopes)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (torch.linalg.norm(out.double() - ref.double()) / torch.linalg.norm(ref.double())).item()


CASES = [  # (T, cached before, Hq, Hkv, D, window, alibi, block_m, block_n)
    (37, 0, 4, 4, 64, None, True, 16, 16),     # ALiBi from an empty cache, T not a multiple of BLOCK_M
    (37, 50, 8, 2, 80, None, True, 16, 16),    # a chunk on a cache, GQA group of 4, head dim 80
    (40, 0, 4, 1, 64, 9, False, 16, 16),       # window smaller than T (and than a tile), one KV head
    (23, 61, 8, 2, 64, 30, False, 16, 32),     # window with q_offset, S not a multiple of BLOCK_N
    (30, 70, 4, 4, 80, 50, True, 16, 16),      # window wider than a tile + ALiBi, head dim 80
    (50, 0, 2, 2, 64, None, False, 32, 16),    # plain causal (the kernel takes it too)
    (5, 100, 4, 1, 64, None, True, 16, 64),    # a few tokens on a longer cache
    (20, 10, 2, 1, 128, 16, True, None, None),  # the default launch shape (one tile) and head dim 128
]


@pytest.mark.parametrize("case", CASES)
def test_float32_matches_math(case: tuple) -> None:
    t, before, hq, hkv, d, window, alibi, bm, bn = case
    s = before + t
    q, kc, vc = inputs(t, before, hq, hkv, d, torch.float32, "cpu", seed=CASES.index(case), spare=7)
    slopes = bloom_slopes(hq) if alibi else None
    ref = math_reference(q, kc[:, :s], vc[:, :s], before, window, slopes)
    kc[:, s:], vc[:, s:] = float("nan"), float("nan")   # past the sequence: never read
    if window is not None:   # key tiles older than every query's window: never read
        skipped = max(0, before - window + 1) // (bn or 64) * (bn or 64)
        kc[:, :skipped], vc[:, :skipped] = float("nan"), float("nan")
    out = triton_prefill.prefill_attention(q, kc[:, :s], vc[:, :s], before, sliding_window=window, alibi=slopes,
                                           block_m=bm, block_n=bn)
    assert out.shape == (t, hq, d) and out.dtype == q.dtype
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("case", [(9, 60, 4, 1, 32, None, True, 16, 16), (12, 40, 2, 2, 80, 25, True, 16, 16),
                                  (20, 50, 2, 1, 64, 44, False, 16, 16)])
def test_split_kv_matches_math(case: tuple, splits: int) -> None:
    """Split-KV (a short chunk on a long cache on the GPU): the key range of each query tile cut in ``splits``
    parts, some of them empty, merged by log-sum-exp."""
    t, before, hq, hkv, d, window, alibi, bm, bn = case
    q, k, v = inputs(t, before, hq, hkv, d, torch.float32, "cpu", seed=11)
    slopes = bloom_slopes(hq) if alibi else None
    out = triton_prefill.prefill_attention(q, k, v, before, sliding_window=window, alibi=slopes, block_m=bm, block_n=bn,
                                           splits=splits)
    assert (out - math_reference(q, k, v, before, window, slopes)).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]])
def test_half_precision_matches_math(case: tuple, dtype: torch.dtype) -> None:
    t, before, hq, hkv, d, window, alibi, bm, bn = case
    q, k, v = inputs(t, before, hq, hkv, d, dtype, "cpu", seed=7)
    slopes = bloom_slopes(hq) if alibi else None
    out = triton_prefill.prefill_attention(q, k, v, before, sliding_window=window, alibi=slopes, block_m=bm, block_n=bn)
    assert out.dtype == dtype
    assert rel_err(out, math_reference(q.float(), k.float(), v.float(), before, window, slopes)) < 1e-2


def test_strided_query_rows() -> None:
    """q as a slice of a fused projection's output (row stride larger than Hq * D)."""
    qkv = torch.randn(21, 6 * 32, generator=torch.Generator().manual_seed(3))
    q = qkv[:, : 4 * 32].view(21, 4, 32)
    k = torch.randn(2, 30, 32, generator=torch.Generator().manual_seed(4))
    v = torch.randn(2, 30, 32, generator=torch.Generator().manual_seed(5))
    out = triton_prefill.prefill_attention(q, k, v, 9, sliding_window=12, block_m=16, block_n=16)
    assert (out - math_reference(q, k, v, 9, 12, None)).abs().max().item() < 1e-5


def test_bad_shapes_are_refused() -> None:
    q, k = torch.zeros(4, 4, 16), torch.zeros(2, 9, 16)
    with pytest.raises(ValueError, match="q_offset"):
        triton_prefill.prefill_attention(q, k, k, 3)
    with pytest.raises(ValueError, match="contiguous rows"):
        triton_prefill.prefill_attention(q, k.transpose(1, 2).contiguous().transpose(1, 2), k, 5)


def test_triton_backend_routes_prompt_chunks_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry point (which first cuts keys no query can see) with the kernel enabled on the CPU as on CUDA."""
    monkeypatch.setattr(attn, "_PREFILL_KERNEL_DEVICES", ("cuda", "cpu"))
    for t, before, window, alibi in ((19, 40, 11, False), (12, 5, None, True), (9, 30, None, False)):
        q, k, v = inputs(t, before, 4, 2, 32, torch.float32, "cpu", seed=t)
        slopes = bloom_slopes(4) if alibi else None
        out = attend_chunk(q, k, v, start=before, backend="triton", sliding_window=window, alibi=slopes)
        ref = attend_chunk(q, k, v, start=before, backend="math", sliding_window=window, alibi=slopes)
        assert (out - ref).abs().max().item() < 1e-5


GPU_CASES = [  # (T, cached before, Hq, Hkv, D, window, alibi)
    (2048, 6144, 32, 8, 128, None, False),    # Llama-3.1-8B: a chunk on a 6k cache
    (256, 32512, 32, 8, 128, None, False),    # ... a warm turn on a 32k history (split-KV)
    (2048, 6144, 32, 8, 128, 4096, False),    # ... with a 4096 window
    (4096, 0, 16, 16, 128, None, True),       # BLOOM-1b7: the first chunk
    (4096, 4096, 16, 16, 128, None, True),    # ... on a cache
    (1000, 3000, 8, 2, 80, 700, True),        # odd sizes everywhere, head dim 80
    (777, 300, 8, 8, 96, None, True),
    (1500, 2500, 8, 4, 256, 1024, False),     # head dim 256 (Gemma-3) with its sliding window
    (513, 0, 8, 1, 64, 100, False),
    (3, 5000, 16, 16, 128, None, True),       # a few tokens on a long cache (split-KV)
    (256, 32512, 16, 16, 128, None, True),    # a warm turn: 256 tokens on a 32k BLOOM history (split-KV)
    (256, 32512, 32, 8, 128, 4096, False),    # ... on a 32k Llama history with a 4096 window
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_matches_math(case: tuple, dtype: torch.dtype) -> None:
    t, before, hq, hkv, d, window, alibi = case
    s = before + t
    q, kc, vc = inputs(t, before, hq, hkv, d, dtype, "cuda", seed=GPU_CASES.index(case), spare=64)
    slopes = bloom_slopes(hq).cuda() if alibi else None
    k, v = kc[:, :s], vc[:, :s]
    ref = math_reference(q.float(), k.float(), v.float(), before, window, slopes)
    for splits in (None, 1, 3):   # the default split-KV factor, none, and three
        out = triton_prefill.prefill_attention(q, k, v, before, sliding_window=window, alibi=slopes, splits=splits)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 32, 4, 2), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3),
                                   (128, 128, 8, 2), (128, 64, 4, 4)])
def test_gpu_launch_shapes_agree(shape: tuple[int, int, int, int]) -> None:
    """Every launch shape the timing sweep (bench/prefill_kernels.py --sweep) tries computes the same thing."""
    bm, bn, warps, stages = shape
    q, k, v = inputs(1111, 2222, 16, 4, 128, torch.bfloat16, "cuda", seed=1)
    slopes = bloom_slopes(16).cuda()
    ref = math_reference(q.float(), k.float(), v.float(), 2222, 1500, slopes)
    out = triton_prefill.prefill_attention(q, k, v, 2222, sliding_window=1500, alibi=slopes, block_m=bm, block_n=bn,
                                           num_warps=warps, num_stages=stages)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
def test_gpu_float32() -> None:
    q, k, v = inputs(700, 900, 8, 2, 64, torch.float32, "cuda", seed=2)
    slopes = bloom_slopes(8).cuda()
    out = triton_prefill.prefill_attention(q, k, v, 900, sliding_window=500, alibi=slopes)
    assert (out - math_reference(q, k, v, 900, 500, slopes)).abs().max().item() < 1e-4
