"""attend_paged (torch and math backends) against the contiguous chunk attention on the same keys.

Each case builds B sequences of different lengths with new rows of different counts (decode rows and prompt
chunks in one batch), scatters their keys into a pool through shuffled block tables, and checks the paged
result against :func:`attend_chunk` (math) on each sequence's keys laid out contiguously: GQA, sliding
windows, ALiBi, sinks (against the float32 reference mask), quantized pools (against the dequantized keys).
"""

from __future__ import annotations

import pytest
import torch

from chatcore.layers.alibi import bloom_slopes
from chatcore.layers.attention import _math, attend_chunk
from chatcore.layers.kv_quant import dequantize, quantize
from chatcore.layers.paged_attention import PAGED_BACKENDS, attend_paged

BS, HQ, HKV, D = 8, 4, 2, 16
# (keys, new rows) per sequence: decode rows, a chunk on top of a cache, a whole prompt, one at a block edge
SEQS = [(37, 1), (20, 7), (9, 9), (16, 1), (50, 13)]


def _case(seed: int, code: torch.dtype | None = None):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    blocks_needed = sum(-(-s // BS) for s, _ in SEQS)
    num_blocks = blocks_needed + 3
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()   # block 0 stays scratch
    kp = torch.zeros(num_blocks, BS, HKV, D)
    vp = torch.zeros(num_blocks, BS, HKV, D)
    width = max(-(-s // BS) for s, _ in SEQS) + 1
    tables = torch.zeros(len(SEQS), width, dtype=torch.int32)
    contiguous = []
    for b, (s, _) in enumerate(SEQS):
        k, v = torch.randn(s, HKV, D, generator=g), torch.randn(s, HKV, D, generator=g)
        n = -(-s // BS)
        mine = [perm.pop() for _ in range(n)]
        tables[b, :n] = torch.tensor(mine)
        for i, blk in enumerate(mine):
            kp[blk, : min(BS, s - i * BS)] = k[i * BS: (i + 1) * BS]
            vp[blk, : min(BS, s - i * BS)] = v[i * BS: (i + 1) * BS]
        contiguous.append((k, v))
    scales = None
    if code is not None:
        (kc, ksc), (vc, vsc) = quantize(kp, code), quantize(vp, code)
        scales = (ksc, vsc)
        kp, vp = kc, vc
        contiguous = []
        for b, (s, _) in enumerate(SEQS):
            rows = tables[b, : -(-s // BS)].long()
            k = dequantize(kc[rows], ksc[rows], torch.float32).flatten(0, 1)[:s]
            v = dequantize(vc[rows], vsc[rows], torch.float32).flatten(0, 1)[:s]
            contiguous.append((k, v))
    n = sum(t for _, t in SEQS)
    q = torch.randn(n, HQ, D, generator=g)
    cu = torch.tensor([0] + torch.tensor([t for _, t in SEQS]).cumsum(0).tolist(), dtype=torch.int32)
    lens = torch.tensor([s for s, _ in SEQS], dtype=torch.int32)
    return q, kp, vp, scales, cu, lens, tables, contiguous


def _expected(q: torch.Tensor, cu: torch.Tensor, contiguous, window, alibi, sinks=0) -> torch.Tensor:  # noqa: ANN001
    out = []
    for b, (s, t) in enumerate(SEQS):
        k, v = (x.transpose(0, 1) for x in contiguous[b])
        qb = q[cu[b]: cu[b + 1]]
        if sinks:
            out.append(_math(qb, k, v, s - t, window, alibi, sinks))
        else:
            out.append(attend_chunk(qb, k, v, start=s - t, backend="math", sliding_window=window, alibi=alibi))
    return torch.cat(out)


@pytest.mark.parametrize("backend", ["torch", "math"])
@pytest.mark.parametrize("window", [None, 5, 12])
@pytest.mark.parametrize("alibi", [False, True])
def test_paged_equals_contiguous(backend: str, window: int | None, alibi: bool) -> None:
    q, kp, vp, _, cu, lens, tables, contiguous = _case(1)
    slopes = bloom_slopes(HQ) if alibi else None
    got = attend_paged(q, kp, vp, cu_q=cu, seq_lens=lens, block_tables=tables, max_q=13, backend=backend,
                       sliding_window=window, alibi=slopes)
    torch.testing.assert_close(got, _expected(q, cu, contiguous, window, slopes), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "math"])
@pytest.mark.parametrize("alibi", [False, True])
def test_sinks_stay_visible_beside_the_window(backend: str, alibi: bool) -> None:
    q, kp, vp, _, cu, lens, tables, contiguous = _case(2)
    slopes = bloom_slopes(HQ) if alibi else None
    got = attend_paged(q, kp, vp, cu_q=cu, seq_lens=lens, block_tables=tables, max_q=13, backend=backend,
                       sliding_window=6, alibi=slopes, sinks=3)
    want = _expected(q, cu, contiguous, 6, slopes, sinks=3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    plain = _expected(q, cu, contiguous, 6, slopes)
    assert (got - plain).abs().max() > 1e-3   # the sinks changed something


@pytest.mark.parametrize("code", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("backend", ["torch", "math"])
def test_quantized_pool_reads_codes_and_scales(code: torch.dtype, backend: str) -> None:
    q, kp, vp, scales, cu, lens, tables, contiguous = _case(3, code)
    got = attend_paged(q, kp, vp, cu_q=cu, seq_lens=lens, block_tables=tables, max_q=13, backend=backend,
                       sliding_window=10, scales=scales)
    torch.testing.assert_close(got, _expected(q, cu, contiguous, 10, None), atol=2e-5, rtol=1e-5)


def test_unknown_backend_takes_torch_and_bad_window_is_refused() -> None:
    q, kp, vp, _, cu, lens, tables, contiguous = _case(4)
    assert {"torch", "math"} <= set(PAGED_BACKENDS)
    got = attend_paged(q, kp, vp, cu_q=cu, seq_lens=lens, block_tables=tables, max_q=13, backend="not-registered")
    torch.testing.assert_close(got, _expected(q, cu, contiguous, None, None), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sliding window"):
        attend_paged(q, kp, vp, cu_q=cu, seq_lens=lens, block_tables=tables, max_q=13, backend="torch",
                     sliding_window=0)
