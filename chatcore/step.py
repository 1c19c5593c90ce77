"""What a forward pass needs to know about positions: where the new tokens go in the slot, and how.

Every model family writes one ``run(ids, step)``; the step owns the positions, the RoPE rotation, the write
into the slot (the sequence's :class:`~chatcore.kv_cache.KVCache`) and the call to the attention entry point,
one per mode, so the same model code serves:

- :class:`EagerStep`: T tokens after the slot's current tokens, positions known on the host (prefill,
  and decode without CUDA graphs): :func:`~chatcore.layers.attention.attend_chunk`;
- :class:`DeviceStep`: one token at a position held in device memory (an int32 tensor) over a slot
  allocated to its full capacity: nothing in it reads a value back to the host, so a CUDA graph can capture
  it once and replay it at every length: :func:`~chatcore.layers.attention.attend_decode`.

On a quantized slot the eager step attends over the dequantized keys and values the slot's write returns; the
device step hands the codes and their scales to the backend.
"""

from __future__ import annotations

from typing import Protocol

import torch

from chatcore.kv_cache import KVCache
from chatcore.layers.attention import attend_chunk, attend_decode
from chatcore.layers.rope import Rotary


class EagerStep:
    """T new tokens after the slot's current ``slot.length`` ones (reserved in the slot here)."""

    def __init__(self, slot: KVCache, t: int, backend: str) -> None:
        slot.reserve(t)
        self.slot, self.t, self.start, self.backend = slot, t, slot.length, backend
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # per rotary (Gemma 3 has two)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rotary: Rotary | None,
               sliding_window: int | None = None, alibi: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] of the new tokens (k not yet rotated) -> attention output [T, Hq, D]."""
        if rotary is not None:
            tables = self._tables.get(id(rotary))
            if tables is None:
                tables = self._tables[id(rotary)] = rotary.tables(self.start, self.t, q.dtype)
            cos, sin = tables
            q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        keys, values = self.slot.write(layer, self.start, k, v)
        return attend_chunk(q, keys, values, start=self.start, backend=self.backend,
                            sliding_window=sliding_window, alibi=alibi)

    def select(self, h: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """The rows of ``h`` [T, ...] whose logits the pass returns: all of them, or the last one."""
        return h if all_logits else h[-1:]


class DeviceStep:
    """One token at the position ``pos`` (int32 [1], on the device) of a slot allocated to its full capacity.
    ``span``: attend over the slot's first ``span`` rows (None: all of them); the position must lie below it."""

    def __init__(self, slot: KVCache, pos: torch.Tensor, backend: str, span: int | None = None) -> None:
        if slot.allocated != slot.capacity:
            raise ValueError("a device-position step needs a slot allocated to its full capacity")
        self.slot, self.pos, self.backend = slot, pos, backend
        self.span = slot.capacity if span is None else span

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rotary: Rotary | None,
               sliding_window: int | None = None, alibi: torch.Tensor | None = None) -> torch.Tensor:
        """q [1, Hq, D], k/v [1, Hkv, D] of the new token (k not yet rotated) -> attention output [1, Hq, D]."""
        tables = None
        scales = self.slot.scales(layer, self.span)   # a quantized slot: codes and their scales
        if rotary is not None:
            # flash-attn's in-kernel rotary takes tables in the query's dtype (as transformers rounds them); a
            # quantized slot's decode takes the triton kernel under flash too
            flash = self.backend == "flash" and scales is None
            tables = rotary.full_tables(q.dtype if flash else torch.float32)
        keys, values = self.slot.k[layer, :, : self.span], self.slot.v[layer, :, : self.span]
        return attend_decode(q, keys, values, pos=self.pos, new_kv=(k, v), backend=self.backend,
                             sliding_window=sliding_window, alibi=alibi, rotary=tables, scales=scales)

    def select(self, h: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """The rows of ``h`` [T, ...] whose logits the pass returns: all of them, or the last one."""
        return h if all_logits else h[-1:]


class Step(Protocol):
    """What a family's ``run`` drives: :class:`EagerStep`, :class:`DeviceStep`, and the batched steps of
    :mod:`chatcore.batch.step` (B sequences in one pass, rows grouped by sequence)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rotary: Rotary | None,
               sliding_window: int | None = None, alibi: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate, store the new keys and values of layer ``layer``, attend; returns [rows, Hq, D]."""
        ...

    def select(self, h: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """The rows of the final hidden states whose logits the pass returns (``all_logits``: every row; else
        each sequence's last)."""
        ...
