"""The Triton decode kernels and the static-cache decode mode of the attention entry point (attend_decode).

On machines without a GPU these run under Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so CI checks the kernels' arithmetic; the GPU machine runs the compiled kernels
(tests/test_gpu_decode.py). References: the plain-math backend, in float64 where it matters.
"""

from __future__ import annotations

import pytest
import torch
from attention_ref import reference

from chatcore.layers.attention import attend_chunk, attend_decode
from chatcore.layers.rope import Rotary

pytest.importorskip("triton")
triton_decode = pytest.importorskip("chatcore.layers.triton_decode")


CASES = [  # (query heads, kv heads, head dim, capacity, position, window, sinks, alibi)
    (8, 2, 64, 300, 130, None, 0, False),
    (6, 6, 32, 200, 0, None, 0, False),       # the very first token
    (6, 6, 32, 200, 57, None, 0, True),       # ALiBi, BLOOM-style (one KV head per query head)
    (8, 2, 64, 300, 250, 40, 0, False),       # sliding window
    (4, 1, 128, 512, 400, 64, 4, False),      # window + attention sinks, MQA
    (6, 3, 80, 200, 199, None, 0, False),     # head dim not a power of two, full cache
    (16, 2, 64, 1100, 1033, None, 0, True),   # many splits, GQA group of 8, ALiBi
]


@pytest.mark.parametrize("case", CASES)
def test_split_k_decode_matches_reference(case: tuple) -> None:
    hq, hkv, d, cap, pos, window, sinks, alibi = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    q = torch.randn(hq, d, generator=g)
    kc, vc = torch.randn(hkv, cap, d, generator=g), torch.randn(hkv, cap, d, generator=g)
    slopes = torch.rand(hq, generator=g) if alibi else None
    out = triton_decode.decode_attention(q, kc, vc, torch.tensor([pos], dtype=torch.int32), sliding_window=window,
                                         sinks=sinks, alibi=slopes)
    ref = reference(q, kc, vc, pos, window, sinks, slopes)
    assert out.shape == (hq, d) and out.dtype == q.dtype
    assert (out.double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("splits", [1, 3, 16])
def test_any_split_count_gives_the_same_answer(splits: int) -> None:
    g = torch.Generator().manual_seed(splits)
    q = torch.randn(4, 32, generator=g)
    kc, vc = torch.randn(2, 700, 32, generator=g), torch.randn(2, 700, 32, generator=g)
    out = triton_decode.decode_attention(q, kc, vc, torch.tensor([650], dtype=torch.int32), splits=splits)
    assert (out.double() - reference(q, kc, vc, 650, None, 0, None)).abs().max().item() < 1e-5


def test_reads_a_view_of_a_larger_cache_and_ignores_rows_past_the_position() -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 64, generator=g)
    store = torch.randn(2, 2, 512, 64, generator=g)     # [layers, heads, allocated, D]: layer 1's view
    kc, vc = store[1], torch.randn(2, 512, 64, generator=g)
    kc[:, 100:] = float("nan")                          # poison: nothing past position 99 may be read
    vc[:, 100:] = float("nan")
    out = triton_decode.decode_attention(q, kc, vc, torch.tensor([99], dtype=torch.int32))
    assert torch.isfinite(out).all()
    assert (out.double() - reference(q, kc, vc, 99, None, 0, None)).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", [  # (query heads, kv heads, head dim, capacity, position, window, sinks, alibi)
    (6, 2, 48, 300, 17, None, 0, False),      # half = 24: not a power of two; one split covers everything
    (8, 2, 64, 700, 650, None, 0, False),     # several splits: only the covering one appends
    (8, 2, 64, 700, 0, None, 0, False),       # the very first token
    (4, 1, 32, 400, 300, 64, 4, False),       # window + sinks
    (4, 4, 32, 200, 128, None, 0, True),      # ALiBi (no RoPE); the position opens a new block
])
@pytest.mark.parametrize("rope", [True, False])
def test_fused_append_rotates_writes_and_attends_the_new_token(case: tuple, rope: bool) -> None:
    hq, hkv, d, cap, pos, window, sinks, alibi = case
    g = torch.Generator().manual_seed(hash(case) % 2**31 + rope)
    tables = (torch.randn(cap, d // 2, generator=g), torch.randn(cap, d // 2, generator=g)) if rope else None
    q, k, v = torch.randn(hq, d, generator=g), torch.randn(hkv, d, generator=g), torch.randn(hkv, d, generator=g)
    kc, vc = torch.randn(hkv, cap, d, generator=g), torch.randn(hkv, cap, d, generator=g)
    kc[:, pos:], vc[:, pos:] = float("nan"), float("nan")   # poison: the position and past it are never read
    slopes = torch.rand(hq, generator=g) if alibi else None
    q0, kc0, vc0 = q.clone(), kc.clone(), vc.clone()
    out = triton_decode.decode_attention(q, kc, vc, torch.tensor([pos], dtype=torch.int32), new_kv=(k, v),
                                         rotary=tables, sliding_window=window, sinks=sinks, alibi=slopes, splits=4)
    qr, kr = q0, k
    if tables is not None:
        c, s = tables[0][pos][None, None], tables[1][pos][None, None]
        qr, kr = Rotary.apply(q0[None], c, s)[0], Rotary.apply(k[None], c, s)[0]
    assert torch.equal(q, q0)                                        # the query is rotated in registers only
    assert torch.allclose(kc[:, pos], kr, atol=1e-6) and torch.equal(vc[:, pos], v)
    others = torch.ones(cap, dtype=torch.bool)
    others[pos] = False
    assert torch.allclose(kc[:, others], kc0[:, others], equal_nan=True, atol=0)   # nothing else written
    assert torch.allclose(vc[:, others], vc0[:, others], equal_nan=True, atol=0)
    ref = reference(qr, kc, vc, pos, window, sinks, slopes)
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_fused_append_in_bfloat16() -> None:
    """bf16: the appended key is the rotation rounded once. (Triton 3.6's CPU interpreter gets ``tl.dot`` of
    bf16 tiles wrong, so the bf16 attention output is checked on the GPU: tests/test_gpu_decode.py.)"""
    g = torch.Generator().manual_seed(11)
    hq, hkv, d, cap, pos = 8, 2, 64, 300, 200
    tables = (torch.randn(cap, d // 2, generator=g), torch.randn(cap, d // 2, generator=g))
    q, k, v = (torch.randn(h, d, generator=g).bfloat16() for h in (hq, hkv, hkv))
    kc, vc = torch.zeros(hkv, cap, d, dtype=torch.bfloat16), torch.zeros(hkv, cap, d, dtype=torch.bfloat16)
    out = triton_decode.decode_attention(q, kc, vc, torch.tensor([pos], dtype=torch.int32), new_kv=(k, v),
                                         rotary=tables, splits=3)
    c, s = tables[0][pos][None, None], tables[1][pos][None, None]
    assert out.shape == (hq, d) and out.dtype == torch.bfloat16
    want = Rotary.apply(k[None].float(), c, s)[0]
    assert torch.allclose(kc[:, pos].float(), want, rtol=2**-7, atol=1e-6)    # one bf16 rounding (the interpreter
    assert torch.equal(vc[:, pos], v)                                          # rounds toward zero, the GPU to even)


@pytest.mark.parametrize("backend", ["triton", "torch", "math"])
@pytest.mark.parametrize("variant", ["rope", "alibi", "window", "sinks"])
def test_static_cache_decode_mode_matches_eager_attention(backend: str, variant: str) -> None:
    """attend_decode (a device position) == rotate, write, then attend_chunk (a host position)."""
    g = torch.Generator().manual_seed(len(backend) * 7 + len(variant))
    hq, hkv, d, cap, pos = 8, 2, 32, 96, 70
    window = 24 if variant in ("window", "sinks") else None
    sinks = 4 if variant == "sinks" else 0
    slopes = torch.rand(hq, generator=g) if variant == "alibi" else None
    tables = (torch.randn(cap, d // 2, generator=g), torch.randn(cap, d // 2, generator=g)) \
        if variant == "rope" else None
    q = torch.randn(1, hq, d, generator=g)
    k, v = torch.randn(1, hkv, d, generator=g), torch.randn(1, hkv, d, generator=g)
    kc, vc = torch.randn(hkv, cap, d, generator=g), torch.randn(hkv, cap, d, generator=g)
    ekc, evc = kc.clone(), vc.clone()
    out = attend_decode(q.clone(), kc, vc, pos=torch.tensor([pos], dtype=torch.int32), backend=backend,
                        sliding_window=window, alibi=slopes, sinks=sinks, new_kv=(k.clone(), v.clone()), rotary=tables)
    qe, ke = q, k
    if tables is not None:
        c, s = tables[0][pos][None, None], tables[1][pos][None, None]
        qe, ke = Rotary.apply(q, c, s), Rotary.apply(k, c, s)
    ekc[:, pos], evc[:, pos] = ke[0], v[0]
    assert torch.allclose(kc, ekc, atol=1e-6) and torch.equal(vc, evc)
    if sinks:
        ref = reference(qe[0], ekc, evc, pos, window, sinks, None)[None]
    else:
        ref = attend_chunk(qe, ekc[:, : pos + 1], evc[:, : pos + 1], start=pos, backend="math", sliding_window=window,
                           alibi=slopes)
    assert (out.double() - ref.double()).abs().max().item() < 1e-5


def test_static_cache_mode_rejects_misuse() -> None:
    q, kc = torch.randn(2, 4, 16), torch.randn(4, 8, 16)
    pos, new_kv = torch.tensor([3], dtype=torch.int32), (torch.randn(1, 4, 16), torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="one query"):
        attend_decode(q, kc, kc.clone(), pos=pos, new_kv=new_kv, backend="math")
    with pytest.raises(ValueError, match="window must be positive"):
        attend_decode(q[:1], kc, kc.clone(), pos=pos, new_kv=new_kv, backend="math", sliding_window=0)


@pytest.mark.parametrize("n", [48, 64, 2048, 3000])
def test_fused_add_rms_norm_and_silu_mul_match_pytorch(n: int) -> None:
    from chatcore.layers.triton_fused import add_rms_norm, silu_mul

    g = torch.Generator().manual_seed(n)
    x, d, w = torch.randn(3, n, generator=g), torch.randn(3, n, generator=g), torch.randn(n, generator=g)
    total, normed = add_rms_norm(x, d, w, 1e-5)
    assert torch.allclose(total, x + d, atol=1e-6)
    assert torch.allclose(normed, torch.nn.functional.rms_norm(x + d, (n,), w, 1e-5), atol=1e-5)
    gu = torch.randn(3, 2 * n, generator=g)
    out = silu_mul(gu)
    assert out.shape == (3, n)
    assert torch.allclose(out, torch.nn.functional.silu(gu[:, :n]) * gu[:, n:], atol=1e-5)


@pytest.mark.parametrize("shape", [(24, 40), (64, 512), (1000, 700)])
def test_gemv_matches_a_float64_product(shape: tuple[int, int]) -> None:
    from chatcore.layers.triton_gemv import gemv

    n, k = shape
    g = torch.Generator().manual_seed(n)
    x, w, b = torch.randn(1, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    for bias in (None, b):
        want = x.double() @ w.double().T + (0 if bias is None else bias.double())
        assert (gemv(x, w, bias).double() - want).abs().max().item() < 1e-3
    with pytest.raises(ValueError, match="row-major"):
        gemv(x, w.T.contiguous().T)


@pytest.mark.parametrize("shape", [(24, 40), (130, 700)])
def test_gemv_with_the_norm_prologue_and_the_residual_epilogue(shape: tuple[int, int]) -> None:
    """``residual + rms_norm(x) @ w.T + b`` in one launch, against float64 from the definitions."""
    from chatcore.layers.triton_gemv import gemv

    n, k = shape
    g = torch.Generator().manual_seed(n + 1)
    x, w, b = torch.randn(1, k, generator=g) * 3, torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    nw, res = torch.randn(k, generator=g), torch.randn(1, n, generator=g)
    xd = x.double()
    normed = xd / (xd.pow(2).mean() + 1e-5).sqrt() * nw.double()
    want = res.double() + normed @ w.double().T + b.double()
    out = gemv(x, w, b, norm=(nw, 1e-5), residual=res)
    assert (out.double() - want).abs().max().item() < 1e-3
    assert (gemv(x, w, norm=(nw, 1e-5)).double() - normed @ w.double().T).abs().max().item() < 1e-3
    assert (gemv(x, w, residual=res).double() - (res.double() + xd @ w.double().T)).abs().max().item() < 1e-3
    with pytest.raises(ValueError, match="residual"):
        gemv(x, w, residual=res[:, :-1])


def test_linear_with_norm_and_residual_off_the_gpu_is_the_unfused_ops() -> None:
    from chatcore.layers.linear import linear
    from chatcore.layers.norm import rms_norm

    g = torch.Generator().manual_seed(12)
    x, w, b = torch.randn(3, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    nw, res = torch.randn(64, generator=g), torch.randn(3, 32, generator=g)
    want = res + torch.nn.functional.linear(rms_norm(x, nw, 1e-6), w, b)
    assert torch.equal(linear(x, w, b, norm=(nw, 1e-6), residual=res), want)


@pytest.mark.parametrize("shape", [(24, 40, 2), (100, 512, 8), (130, 700, 4)])   # (N gate rows, K, rows/program)
def test_gemv_gate_up_silu_matches_a_float64_reference(shape: tuple[int, int, int]) -> None:
    from chatcore.layers.triton_gemv import gemv_gate_up_silu

    n, k, block_n = shape
    g = torch.Generator().manual_seed(n + block_n)
    x, w, b = torch.randn(1, k, generator=g), torch.randn(2 * n, k, generator=g), torch.randn(2 * n, generator=g)
    for bias in (None, b):
        gu = x.double() @ w.double().T + (0 if bias is None else bias.double())
        want = torch.nn.functional.silu(gu[:, :n]) * gu[:, n:]
        out = gemv_gate_up_silu(x, w, bias, block_n)
        assert out.shape == (1, n) and out.dtype == x.dtype
        assert (out.double() - want).abs().max().item() < 1e-3
    nw = torch.randn(k, generator=g)
    normed = x.double() / (x.double().pow(2).mean() + 1e-6).sqrt() * nw.double()
    gu = normed @ w.double().T + b.double()
    want = torch.nn.functional.silu(gu[:, :n]) * gu[:, n:]
    assert (gemv_gate_up_silu(x, w, b, block_n, norm=(nw, 1e-6)).double() - want).abs().max().item() < 1e-3
    with pytest.raises(ValueError, match="row-major"):
        gemv_gate_up_silu(x, w.T.contiguous().T)


def test_gemv_gate_up_silu_in_bfloat16() -> None:
    from chatcore.layers.triton_gemv import gemv_gate_up_silu

    g = torch.Generator().manual_seed(7)
    n, k = 256, 384
    x, w = torch.randn(1, k, generator=g).bfloat16(), (torch.randn(2 * n, k, generator=g) / k**0.5).bfloat16()
    gu = x.double() @ w.double().T
    want = torch.nn.functional.silu(gu[:, :n]) * gu[:, n:]
    out = gemv_gate_up_silu(x, w)
    assert out.dtype == torch.bfloat16
    assert (torch.linalg.norm(out.double() - want) / torch.linalg.norm(want)).item() < 2e-2


def test_gate_up_silu_off_the_gpu_is_the_unfused_pair() -> None:
    from chatcore.layers.activation import gate_up_silu, silu_mul
    from chatcore.layers.linear import linear

    g = torch.Generator().manual_seed(8)
    x, w, b = torch.randn(1, 64, generator=g), torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    assert torch.equal(gate_up_silu(x, w, b), silu_mul(linear(x, w, b)))
    nw = torch.randn(64, generator=g)
    assert torch.equal(gate_up_silu(x, w, b, norm=(nw, 1e-6)), silu_mul(linear(x, w, b, norm=(nw, 1e-6))))
