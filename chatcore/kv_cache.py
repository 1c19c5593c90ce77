"""The KV cache: one slot per live sequence, with the token ids it holds beside it.

Keys are stored already rotated (RoPE applied), so attention kernels read them as they are. The layout
is head-major, [layers, kv_heads, positions, head_dim], so each head's keys are contiguous (what
PyTorch's attention reads fastest; flash-attn takes the transposed view). Storage grows on demand up
to ``capacity`` tokens, or is allocated whole at once (``preallocate``: buffers that never move, which a
captured CUDA graph needs). A slot knows its tokens, so the next request prefills only
what differs (:meth:`common_prefix`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chatcore.errors import PromptTooLong
from chatcore.layers.rope import Rotary
from chatcore.prefix import common_prefix

_GROW = 256  # allocation granularity in tokens


class KVCache:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, rotary: Rotary | None, preallocate: bool = False) -> None:
        self.capacity = capacity
        self.rotary = rotary
        self._shape = (num_layers, num_kv_heads, 0, head_dim)
        self._dtype, self._device = dtype, device
        # preallocated: zeros, since a masked read of a static buffer must never meet NaN garbage (0 * NaN)
        make = torch.zeros if preallocate else torch.empty
        size = capacity if preallocate else 0
        self.k = make((num_layers, num_kv_heads, size, head_dim), dtype=dtype, device=device)
        self.v = make((num_layers, num_kv_heads, size, head_dim), dtype=dtype, device=device)
        self.tokens: list[int] = []
        self.decode_graph: object | None = None   # the engine's captured decode step for this slot, if any

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def allocated(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    # -- growth -------------------------------------------------------------------------------
    @torch.inference_mode()
    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more tokens; raise :class:`PromptTooLong` past the capacity."""
        need = self.length + extra
        if need > self.capacity:
            raise PromptTooLong(
                f"{need} tokens do not fit the context window of {self.capacity}; "
                "shorten the prompt or raise the window (max_seq_len)")
        if need <= self.allocated:
            return
        size = min(self.capacity, max(need, 2 * self.allocated, _GROW))
        size = min(self.capacity, -(-size // _GROW) * _GROW)
        shape = (*self._shape[:2], size, self._shape[3])
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.empty(shape, dtype=self._dtype, device=self._device)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    # -- writes during a forward pass -------------------------------------------------------------
    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [T, Hkv, D] keys/values at ``start``; return [Hkv, S, D] views of everything up to them."""
        end = start + k.shape[0]
        self.k[layer, :, start:end] = k.transpose(0, 1)
        self.v[layer, :, start:end] = v.transpose(0, 1)
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def commit(self, ids: Sequence[int]) -> None:
        """Record the token ids whose keys/values the last forward pass wrote."""
        self.tokens.extend(int(i) for i in ids)

    # -- the verb API -----------------------------------------------------------------------------
    def common_prefix(self, ids: Sequence[int]) -> int:
        """How many leading tokens of ``ids`` this slot already holds."""
        return common_prefix(self.tokens, ids)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a slot of {self.length} tokens to {n}")
        del self.tokens[n:]

    @torch.inference_mode()
    def drop(self, start: int, end: int) -> None:
        """Remove tokens ``start .. end-1``; what follows moves back by ``end - start`` positions.

        Moved keys are re-rotated by ``-(end - start)`` (RoPE); models without RoPE (ALiBi) need none.
        """
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"cannot drop [{start}, {end}) from a slot of {self.length} tokens")
        delta = end - start
        if delta == 0:
            return
        n = self.length
        moved = n - end
        if moved:
            k = self.k[:, :, end:n].clone()
            if self.rotary is not None:
                k = self.rotary.shift(k, -delta)
            self.k[:, :, start : start + moved] = k
            self.v[:, :, start : start + moved] = self.v[:, :, end:n].clone()
        del self.tokens[start:end]

    def reset(self) -> None:
        """Forget every token (storage is kept for reuse)."""
        self.tokens.clear()
