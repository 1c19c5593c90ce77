"""The batched steps: B sequences in one forward pass over a :class:`~chatcore.batch.paged.PagedPool`.

A family's ``run(ids, step)`` takes ids [N] and hidden rows [N, ...] grouped by sequence, in the order given:
sequence b's rows are its ``counts[b]`` new tokens, after the ``slot.length`` tokens its slot holds. Per layer
the step rotates q and k at each row's own position, writes k and v at each row's (block, offset) in the pool
(quantized when the pool is; half precision on a GPU: one launch for all of it,
:mod:`chatcore.layers.triton_rope_write`) and calls :func:`~chatcore.layers.paged_attention.attend_paged`;
``select`` then keeps each sequence's last row for the head.

- :class:`BatchStep`: any mix of decode tokens and prompt chunks, positions known on the host (the slots'
  lengths); the slots must have been reserved for their new tokens.
- :class:`DeviceBatchStep`: B sequences x 1 token, everything in device tensors (positions, block tables,
  sequence lengths) and nothing read back on the host by the step itself, so a CUDA graph captures it once and
  replays it for any positions and tables (:mod:`chatcore.batch.graphs`) on the kernels that take device
  lengths (``triton``, ``flash``; ``torch`` and ``math`` read the lengths on the host). Padded rows past the live
  batch: position 0, sequence length 1, a table of zeros (they write and read the scratch block 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chatcore.batch.paged import PagedPool, PagedSlot
from chatcore.layers.kv_quant import copy_rows, quantize
from chatcore.layers.norm import use_fused
from chatcore.layers.paged_attention import attend_paged
from chatcore.layers.rope import Rotary


class _PagedWrites:
    """What both batched steps share: rotation by per-row positions, the pool writes, the attention call."""

    pool: PagedPool
    backend: str
    positions: torch.Tensor     # long [N], on the pool's device
    rows: torch.Tensor          # long [N]: each row's place in the flattened [num_blocks * block_size] storage
    cu_q: torch.Tensor          # int32 [B + 1]
    seq_lens: torch.Tensor      # int32 [B]
    block_tables: torch.Tensor  # int32 [B, W]
    max_q: int

    def _init_tables(self) -> None:
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # per rotary and dtype

    def _cos_sin(self, rotary: Rotary, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin [N, 1, D/2] of each row's position in ``dtype`` (made once a step per rotary)."""
        key = id(rotary)
        tables = self._tables.get(key)
        if tables is None or tables[0].dtype != dtype:
            tables = self._tables[key] = (rotary.cos.index_select(0, self.positions)[:, None, :].to(dtype),
                                          rotary.sin.index_select(0, self.positions)[:, None, :].to(dtype))
        return tables

    def _write(self, layer: int, flat_k: torch.Tensor, flat_v: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """k (rotated) and v into their rows of the layer's pools, quantized when the pool is: its scales, or None."""
        p = self.pool
        if p.k_scale is None or p.v_scale is None:
            flat_k.index_copy_(0, self.rows, k.to(flat_k.dtype))
            flat_v.index_copy_(0, self.rows, v.to(flat_v.dtype))
            return None
        scales = (p.k_scale[layer], p.v_scale[layer])
        for flat, sc, x in ((flat_k, scales[0], k), (flat_v, scales[1], v)):
            codes, s = quantize(x, flat.dtype)
            copy_rows(flat, 0, self.rows, codes)
            sc.view(-1, sc.shape[-1]).index_copy_(0, self.rows, s)
        return scales

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rotary: Rotary | None,
               sliding_window: int | None = None, alibi: torch.Tensor | None = None) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] of every sequence's new rows (k not yet rotated) -> [N, Hq, D]."""
        p = self.pool
        kp, vp = p.k[layer], p.v[layer]
        flat_k, flat_v = kp.view(-1, *kp.shape[2:]), vp.view(-1, *vp.shape[2:])
        scales = None
        if rotary is not None and p.k_scale is None and use_fused(q) and _rope_write_takes(q, k, v, flat_k, flat_v):
            from chatcore.layers.triton_rope_write import rope_write

            cos, sin = self._cos_sin(rotary, q.dtype)   # one launch: q rotated, k rotated and v written
            n = q.shape[0]
            q = rope_write(q, k, v, cos.view(n, -1), sin.view(n, -1), self.rows, flat_k, flat_v)
        else:
            if rotary is not None:
                cos, sin = self._cos_sin(rotary, q.dtype)
                q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
            scales = self._write(layer, flat_k, flat_v, k, v)
        return attend_paged(q, kp, vp, cu_q=self.cu_q, seq_lens=self.seq_lens, block_tables=self.block_tables,
                            max_q=self.max_q, backend=self.backend, sliding_window=sliding_window, alibi=alibi,
                            scales=scales)


class BatchStep(_PagedWrites):
    """``counts[b]`` new tokens of each slot after its ``slot.length`` ones (the slots reserved for them)."""

    def __init__(self, pool: PagedPool, slots: Sequence[PagedSlot], counts: Sequence[int], backend: str) -> None:
        if len(slots) != len(counts) or not slots:
            raise ValueError("a batch step needs one count of new tokens per slot, and at least one slot")
        self.pool, self.backend = pool, backend
        self.slots, self.counts = list(slots), list(counts)
        positions: list[int] = []
        rows: list[int] = []
        cu, lens = [0], []
        for slot, t in zip(slots, counts, strict=True):
            if t <= 0:
                raise ValueError("every sequence of a batch step needs at least one new token")
            start = slot.length
            if start + t > slot.allocated:
                raise ValueError(f"a slot holding {slot.allocated} positions was not reserved for {t} more tokens "
                                 f"after its {start}")
            span = range(start, start + t)
            positions.extend(span)
            rows.extend(pool.flat_rows(slot.blocks, span))
            cu.append(cu[-1] + t)
            lens.append(start + t)
        width = max(len(s.blocks) for s in slots)
        dev = pool.device
        self.positions = torch.tensor(positions, dtype=torch.long, device=dev)
        self.rows = torch.tensor(rows, dtype=torch.long, device=dev)
        self.cu_q = torch.tensor(cu, dtype=torch.int32, device=dev)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        self.block_tables = torch.tensor([s.table(width) for s in slots], dtype=torch.int32, device=dev)
        self.max_q = max(counts)
        self.last = torch.tensor(cu[1:], dtype=torch.long, device=dev) - 1
        self._init_tables()

    def last_rows(self, h: torch.Tensor) -> torch.Tensor:
        """Each sequence's last row of ``h`` [N, ...] -> [B, ...]."""
        return h.index_select(0, self.last)

    def select(self, h: torch.Tensor, all_logits: bool) -> torch.Tensor:
        return h if all_logits else self.last_rows(h)


class DeviceBatchStep(_PagedWrites):
    """B sequences x 1 token: ``positions`` int32 [B] (each token's position), ``block_tables`` int32 [B, W],
    ``seq_lens`` int32 [B] (= positions + 1), all on the pool's device; ``cu_q`` int32 [B + 1] (0 .. B), made
    here when not given (a graph passes its static one)."""

    def __init__(self, pool: PagedPool, positions: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 backend: str, cu_q: torch.Tensor | None = None) -> None:
        self.pool, self.backend = pool, backend
        b = positions.shape[0]
        self.positions = positions.long()
        self.block_tables, self.seq_lens = block_tables, seq_lens
        self.cu_q = cu_q if cu_q is not None else torch.arange(b + 1, dtype=torch.int32, device=positions.device)
        bs = pool.block_size
        block = block_tables.gather(1, (self.positions // bs)[:, None])[:, 0].long()
        self.rows = block * bs + self.positions % bs
        self.max_q = 1
        self._init_tables()

    def last_rows(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def select(self, h: torch.Tensor, all_logits: bool) -> torch.Tensor:
        return h


def _rope_write_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flat_k: torch.Tensor,
                      flat_v: torch.Tensor) -> bool:
    from chatcore.layers.triton_rope_write import takes

    return takes(q, k, v, flat_k, flat_v)
