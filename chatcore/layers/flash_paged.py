"""flash-attn's kernels over paged KV memory: the ``flash`` backend of
:func:`~chatcore.layers.paged_attention.attend_paged`.

- a decode-only batch (one row per sequence): ``flash_attn_with_kvcache`` on q [B, 1, Hq, D] with the pools as
  its paged cache (``block_table``, ``cache_seqlens`` = seq_lens: the new rows are already written), read on
  the device only, so a CUDA graph captures it;
- chunks and mixed batches: ``flash_attn_varlen_func`` with ``block_table`` (``cu_seqlens_k`` is computed on
  the device from seq_lens; ``max_seqlen_k`` is the tables' width in keys, an upper bound).

Both align the causal mask bottom-right; flash-attn's window ``(left, right)`` counts keys before the query's
own (``(window - 1, 0)``) and its ALiBi bias ``-slope * |i - j|`` equals ours on the visible keys.

flash-attn 2 takes paged KV only in blocks of a multiple of 256 keys, and has no quantized cache and no
attention sinks; those pools (and float32, or a head size it does not take) go to the triton backend
(:func:`chatcore.layers.triton_paged.attend_triton`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatcore.layers.triton_paged import ChunkPath, attend_triton

FLASH_BLOCK = 256   # flash-attn 2's paged KV: block sizes a multiple of this


def takes(q: torch.Tensor, k_pool: torch.Tensor, sliding_window: int | None, sinks: int,
          scales: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
    """Whether flash-attn's paged kernels take this call (else the triton backend runs it)."""
    d = q.shape[-1]
    return (scales is None and not (sinks and sliding_window is not None) and k_pool.shape[1] % FLASH_BLOCK == 0
            and q.dtype in (torch.float16, torch.bfloat16) and k_pool.dtype == q.dtype and d % 8 == 0 and d <= 256
            and q.is_cuda)


def attend_flash(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, cu_q: torch.Tensor,
                 seq_lens: torch.Tensor, block_tables: torch.Tensor, max_q: int, sliding_window: int | None,
                 alibi: torch.Tensor | None, sinks: int, scales: tuple[torch.Tensor, torch.Tensor] | None, *,
                 chunks: ChunkPath) -> torch.Tensor:
    """The ``flash`` backend (attend_paged's arguments, in order); ``chunks``: the triton fallback's chunk path."""
    if not takes(q, k_pool, sliding_window, sinks, scales):
        return attend_triton(q, k_pool, v_pool, cu_q, seq_lens, block_tables, max_q, sliding_window, alibi, sinks,
                             scales, chunks=chunks)
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    slopes = None if alibi is None else alibi.to(device=q.device, dtype=torch.float32)
    b, width = block_tables.shape
    if max_q == 1 and q.shape[0] == b:
        return flash_attn_with_kvcache(q[:, None], k_pool, v_pool, cache_seqlens=seq_lens, block_table=block_tables,
                                       causal=True, window_size=window, alibi_slopes=slopes)[:, 0]
    cu_k = F.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
    return flash_attn_varlen_func(q, k_pool, v_pool, cu_q, cu_k, max_q, width * k_pool.shape[1], causal=True,
                                  window_size=window, alibi_slopes=slopes, block_table=block_tables)
