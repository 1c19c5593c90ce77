"""Sliding window and ALiBi through the one attention entry point: every backend, against a naive loop."""

from __future__ import annotations

import math

import pytest
import torch

from chatcore.layers.alibi import bloom_slopes
from chatcore.layers.attention import attend_chunk

torch.set_num_threads(1)


def naive(q, k, v, q_offset, window, slopes):  # noqa: ANN001, ANN201
    """One query at a time, one key at a time: the definition the backends must meet."""
    t, hq, d = q.shape
    hkv = k.shape[0]
    out = torch.empty(t, hq, d, dtype=torch.float64)
    for i in range(t):
        pos = q_offset + i
        lo = 0 if window is None else max(0, pos - window + 1)
        for h in range(hq):
            kh, vh = k[h // (hq // hkv), lo : pos + 1].double(), v[h // (hq // hkv), lo : pos + 1].double()
            scores = kh @ q[i, h].double() / math.sqrt(d)
            if slopes is not None:
                scores = scores + slopes[h].double() * (torch.arange(lo, pos + 1) - pos)
            out[i, h] = scores.softmax(-1) @ vh
    return out


CASES = [  # (T, cached before, Hq, Hkv, D, window, alibi)
    (1, 40, 4, 2, 16, 8, False), (1, 5, 4, 2, 16, 8, False), (23, 0, 4, 2, 16, 8, False),
    (9, 30, 6, 3, 32, 16, False), (12, 3, 4, 4, 16, 64, False), (17, 0, 6, 6, 16, None, True),
    (1, 33, 6, 6, 16, None, True), (10, 20, 5, 5, 32, None, True), (9, 30, 4, 4, 16, 7, True),
]


@pytest.mark.parametrize("backend", ["math", "torch", "triton"])
@pytest.mark.parametrize("case", CASES)
def test_window_and_alibi_match_the_definition(backend: str, case: tuple) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    t, before, hq, hkv, d, window, use_alibi = case
    g = torch.Generator().manual_seed(t * 100 + before)
    q = torch.randn(t, hq, d, generator=g)
    k = torch.randn(hkv, before + t, d, generator=g)
    v = torch.randn(hkv, before + t, d, generator=g)
    slopes = bloom_slopes(hq) if use_alibi else None
    out = attend_chunk(q, k, v, start=before, backend=backend, sliding_window=window, alibi=slopes)
    assert out.shape == (t, hq, d)
    assert (out.double() - naive(q, k, v, before, window, slopes)).abs().max().item() < 1e-5


def test_bad_window_is_refused() -> None:
    q, k = torch.zeros(1, 2, 8), torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="window"):
        attend_chunk(q, k, k, start=3, backend="math", sliding_window=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "flash", "triton"])
@pytest.mark.parametrize("case", CASES)
def test_gpu_window_and_alibi(backend: str, case: tuple) -> None:
    pytest.importorskip({"torch": "torch", "flash": "flash_attn", "triton": "triton"}[backend])
    t, before, hq, hkv, d, window, use_alibi = case
    g = torch.Generator(device="cuda").manual_seed(t)
    q = torch.randn(t, hq, d, generator=g, device="cuda").bfloat16()
    k = torch.randn(hkv, before + t, d, generator=g, device="cuda").bfloat16()
    v = torch.randn(hkv, before + t, d, generator=g, device="cuda").bfloat16()
    slopes = bloom_slopes(hq).cuda() if use_alibi else None
    ref = attend_chunk(q.double(), k.double(), v.double(), start=before, backend="math",
                       sliding_window=window, alibi=slopes)
    out = attend_chunk(q, k, v, start=before, backend=backend, sliding_window=window, alibi=slopes).double()
    assert torch.linalg.norm(out - ref) / torch.linalg.norm(ref) < 1e-2


def test_long_alibi_chunks_are_split_to_bound_the_bias_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import chatcore.layers.attention as attn

    monkeypatch.setattr(attn, "_MASK_BYTES", 4096)   # forces several levels of query splits
    g = torch.Generator().manual_seed(11)
    q = torch.randn(37, 4, 16, generator=g)
    k, v = torch.randn(4, 60, 16, generator=g), torch.randn(4, 60, 16, generator=g)
    slopes = bloom_slopes(4)
    for window in (None, 9):
        out = attend_chunk(q, k, v, start=23, backend="torch", sliding_window=window, alibi=slopes)
        assert (out.double() - naive(q, k, v, 23, window, slopes)).abs().max().item() < 1e-5
