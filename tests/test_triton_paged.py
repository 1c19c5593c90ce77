"""The Triton decode kernel over paged KV memory (chatcore/layers/triton_paged.py) and the paged chunk path.

Run under Triton's CPU interpreter here (tests/conftest.py sets TRITON_INTERPRET=1), against a float64
reference: each sequence's keys gathered through its block table, then tests/attention_ref.py's reference.
Shapes are small: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch
from attention_ref import reference

from chatcore.layers.kv_quant import dequantize, quantize
from chatcore.layers.paged_attention import attend_paged

pytest.importorskip("triton")
triton_paged = pytest.importorskip("chatcore.layers.triton_paged")


def make_pool(lens: list[int], hkv: int, d: int, bs: int, *, seed: int, width: int | None = None,
              kv_dtype: torch.dtype | None = None):  # noqa: ANN201
    """A pool whose sequences own shuffled blocks (never block 0); rows past each length and unowned blocks
    hold NaN (codes: NaN scales), so a kernel that reads them fails."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    width = width or max(need)
    nb = 1 + sum(need) + 2
    order = (torch.randperm(nb - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    k = torch.full((nb, bs, hkv, d), float("nan"))
    v = torch.full((nb, bs, hkv, d), float("nan"))
    seqs = []
    for b, n in enumerate(lens):
        own = [order.pop() for _ in range(need[b])]
        tables[b, : len(own)] = torch.tensor(own, dtype=torch.int32)
        kc, vc = torch.randn(hkv, n, d, generator=g), torch.randn(hkv, n, d, generator=g)
        for j in range(n):
            k[own[j // bs], j % bs], v[own[j // bs], j % bs] = kc[:, j], vc[:, j]
        seqs.append((kc, vc))
    if kv_dtype is None:
        return k, v, None, tables, seqs
    scales = []
    pools = []
    for x in (k, v):
        bad = torch.isnan(x[..., 0])
        codes, sc = quantize(torch.nan_to_num(x), kv_dtype)
        sc[bad] = float("nan")
        pools.append(codes)
        scales.append(sc)
    # the reference attends over the values the codes stand for
    seqs = []
    for b, n in enumerate(lens):
        rows = []
        for x, sc in zip(pools, scales, strict=True):
            blocks = tables[b, : need[b]].long()
            rows.append(dequantize(x[blocks], sc[blocks], torch.float32).flatten(0, 1)[:n].transpose(0, 1))
        seqs.append(tuple(rows))
    return pools[0], pools[1], (scales[0], scales[1]), tables, seqs


DECODE_CASES = [  # (lens, Hq, Hkv, D, block size, window, sinks, alibi, kv dtype)
    ([37, 1, 70], 8, 2, 32, 16, None, 0, False, None),              # GQA, ragged lengths (one of a single key)
    ([90, 50], 4, 1, 64, 16, 24, 4, False, None),                   # window + sinks, MQA
    ([45, 80], 4, 4, 32, 32, None, 0, True, None),                  # ALiBi, one KV head per query head
    ([60, 17], 4, 2, 32, 16, None, 0, False, torch.int8),           # int8 codes
    ([60, 33], 4, 2, 32, 16, 20, 2, True, torch.float8_e4m3fn),     # fp8 codes, window + sinks + ALiBi
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{len(c[0])}seq-{c[1]}x{c[2]}-bs{c[4]}")
def test_paged_decode_matches_reference(case: tuple) -> None:
    lens, hq, hkv, d, bs, window, sinks, alibi, kv_dtype = case
    k, v, scales, tables, seqs = make_pool(lens, hkv, d, bs, seed=len(lens) * 31 + hq + d, width=6,
                                           kv_dtype=kv_dtype)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(len(lens), hq + 2 * hkv, d, generator=g)[:, :hq]   # a view of a fused q/k/v projection
    slopes = torch.rand(hq, generator=g) if alibi else None
    out = triton_paged.paged_decode(q, k, v, torch.tensor(lens, dtype=torch.int32), tables, sliding_window=window,
                                    sinks=sinks, alibi=slopes, scales=scales, splits=2)
    assert out.shape == q.shape and out.dtype == q.dtype
    for b, n in enumerate(lens):
        kc, vc = seqs[b]
        ref = reference(q[b], kc, vc, n - 1, window, sinks, slopes)
        assert (out[b].double() - ref).abs().max().item() < 1e-5, b


def test_last_rows_of_a_mixed_batch_and_any_split_count() -> None:
    """With cu_q the kernel computes each sequence's last row only and leaves the others' memory alone."""
    lens = [50, 23]
    k, v, _, tables, seqs = make_pool(lens, 2, 32, 16, seed=5)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(4, 4, 32, generator=g)          # sequence 0: rows 0..2 (a chunk), sequence 1: row 3
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)
    for splits in (1, 3):
        out = torch.full_like(q, 5.0)
        triton_paged.paged_decode(q, k, v, torch.tensor(lens, dtype=torch.int32), tables, cu_q=cu, out=out,
                                  splits=splits)
        assert torch.equal(out[:2], torch.full_like(out[:2], 5.0))
        for b, row in ((0, 2), (1, 3)):
            ref = reference(q[row], *seqs[b], lens[b] - 1, None, 0, None)
            assert (out[row].double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("variant", ["plain", "window_sinks", "alibi_int8"])
def test_triton_backend_of_attend_paged_on_a_mixed_batch(variant: str) -> None:
    """Decode rows and a prompt chunk in one batch: the decode kernel for every last row, the gather path for the
    chunk's rows; equal to the math backend."""
    lens, q_lens = [40, 29, 16], [1, 5, 1]
    window = 12 if variant == "window_sinks" else None
    sinks = 3 if variant == "window_sinks" else 0
    kv_dtype = torch.int8 if variant == "alibi_int8" else None
    k, v, scales, tables, _ = make_pool(lens, 2, 16, 16, seed=len(variant), kv_dtype=kv_dtype)
    if scales is not None:   # the math backend gathers whole blocks: no NaN scale inside an owned block
        scales = tuple(torch.nan_to_num(s) for s in scales)
    else:
        k, v = torch.nan_to_num(k), torch.nan_to_num(v)
    g = torch.Generator().manual_seed(9)
    q = torch.randn(sum(q_lens), 4, 16, generator=g)
    slopes = torch.rand(4, generator=g) if variant == "alibi_int8" else None
    args = dict(cu_q=torch.tensor([0, 1, 6, 7], dtype=torch.int32), seq_lens=torch.tensor(lens, dtype=torch.int32),
                block_tables=tables, max_q=5, sliding_window=window, alibi=slopes, sinks=sinks, scales=scales)
    got = attend_paged(q, k, v, backend="triton", **args)
    want = attend_paged(q.double(), k if scales else k.double(), v if scales else v.double(), backend="math",
                        **args)
    assert (got.double() - want.double()).abs().max().item() < 1e-5
    # decode-only: one row per sequence, no host read
    one = q[[0, 5, 6]].contiguous()
    args.update(cu_q=torch.tensor([0, 1, 2, 3], dtype=torch.int32), max_q=1)
    got = attend_paged(one, k, v, backend="triton", **args)
    assert (got - attend_paged(one, k, v, backend="math", **args)).abs().max().item() < 1e-5


def test_flash_backend_off_the_gpu_takes_triton() -> None:
    """flash_paged.takes refuses what flash-attn cannot run (here: a CPU tensor, block size 16) -> triton."""
    from chatcore.layers.flash_paged import takes

    k, v, _, tables, _ = make_pool([20, 3], 2, 16, 16, seed=2)
    k, v = torch.nan_to_num(k), torch.nan_to_num(v)
    q = torch.randn(2, 4, 16)
    assert not takes(q, k, None, 0, None)
    args = dict(cu_q=torch.tensor([0, 1, 2], dtype=torch.int32), seq_lens=torch.tensor([20, 3], dtype=torch.int32),
                block_tables=tables, max_q=1)
    got = attend_paged(q, k, v, backend="flash", **args)
    assert (got - attend_paged(q, k, v, backend="math", **args)).abs().max().item() < 1e-5


def test_rejects_misuse() -> None:
    k, v, _, tables, _ = make_pool([20], 2, 16, 16, seed=1)
    q, lens = torch.randn(1, 4, 16), torch.tensor([20], dtype=torch.int32)
    with pytest.raises(ValueError, match="one query per sequence"):
        triton_paged.paged_decode(torch.randn(2, 4, 16), k, v, lens, tables)
    with pytest.raises(ValueError, match="needs its scales"):
        triton_paged.paged_decode(q, k.to(torch.int8), v.to(torch.int8), lens, tables)
    with pytest.raises(ValueError, match="int32"):
        triton_paged.paged_decode(q, k, v, lens.long(), tables)
    with pytest.raises(ValueError, match="power of two"):
        triton_paged.paged_decode(q, k[:, :12], v[:, :12], lens, tables)
