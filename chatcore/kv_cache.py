"""The KV cache: one slot per live sequence, with the token ids it holds beside it.

Keys are stored already rotated (RoPE applied), so attention kernels read them as they are. The layout
is head-major, [layers, kv_heads, positions, head_dim], so each head's keys are contiguous (what
PyTorch's attention reads fastest; flash-attn takes the transposed view). Storage grows on demand up
to ``capacity`` tokens, or is allocated whole at once (``preallocate``: buffers that never move, which a
captured CUDA graph needs). A slot knows its tokens, so the next request prefills only
what differs (:meth:`common_prefix`).

Quantized (``kv_dtype`` "int8" or "fp8", :mod:`chatcore.layers.kv_quant`): ``k``/``v`` hold the codes and
``k_scale``/``v_scale`` [layers, kv_heads, positions] the float32 scales, one per token per head. :meth:`write`
quantizes the new rows and returns the dequantized keys and values the chunk attends to (a temporary per
layer, in the compute dtype); a decode step on the device (:class:`chatcore.step.DeviceStep`) hands codes
and scales to the attention backend, which appends the new token quantized.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chatcore.errors import PromptTooLong
from chatcore.layers.kv_quant import code_dtype, dequantize, quantize
from chatcore.layers.rope import Rotary
from chatcore.prefix import common_prefix

_GROW = 256  # allocation granularity in tokens


class KVCache:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, rotary: Rotary | None, preallocate: bool = False,
                 kv_dtype: str | None = None) -> None:
        """``dtype``: the compute dtype; ``kv_dtype``: the storage (None: ``dtype``; "int8" or "fp8": codes and
        per-head scales)."""
        self.capacity = capacity
        self.rotary = rotary
        self.kv_dtype = kv_dtype
        self._shape = (num_layers, num_kv_heads, 0, head_dim)
        self._dtype, self._device = dtype, device
        self._code = dtype if kv_dtype is None else code_dtype(kv_dtype)
        # preallocated: zeros, since a masked read of a static buffer must never meet NaN garbage (0 * NaN)
        make = torch.zeros if preallocate else torch.empty
        size = capacity if preallocate else 0
        self.k = make((num_layers, num_kv_heads, size, head_dim), dtype=self._code, device=device)
        self.v = make((num_layers, num_kv_heads, size, head_dim), dtype=self._code, device=device)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        if kv_dtype is not None:
            self.k_scale = make((num_layers, num_kv_heads, size), dtype=torch.float32, device=device)
            self.v_scale = make((num_layers, num_kv_heads, size), dtype=torch.float32, device=device)
        self.tokens: list[int] = []
        self.decode_graph: object | None = None   # the engine's captured decode step for this slot, if any

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def allocated(self) -> int:
        return self.k.shape[2]

    @property
    def quantized(self) -> bool:
        return self.kv_dtype is not None

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (what attention reads: the stored dtype, or what the codes dequantize to)."""
        return self._dtype

    def nbytes(self) -> int:
        """Bytes of the cache's storage (codes and scales when quantized)."""
        tensors = [self.k, self.v] if self.k_scale is None else [self.k, self.v, self.k_scale, self.v_scale]
        return sum(t.numel() * t.element_size() for t in tensors)

    def scales(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer ``layer``'s key and value scales [Hkv, end] (None: not quantized)."""
        if self.k_scale is None or self.v_scale is None:
            return None
        return self.k_scale[layer, :, :end], self.v_scale[layer, :, :end]

    def layer_kv(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values of positions 0 .. end-1, [Hkv, end, D] in the compute dtype
        (views; dequantized copies when quantized)."""
        k, v = self.k[layer, :, :end], self.v[layer, :, :end]
        sc = self.scales(layer, end)
        if sc is None:
            return k, v
        return dequantize(k, sc[0], self._dtype), dequantize(v, sc[1], self._dtype)

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
        for name, shape_, dtype in (("k", shape, self._code), ("v", shape, self._code),
                                    ("k_scale", shape[:3], torch.float32), ("v_scale", shape[:3], torch.float32)):
            old = getattr(self, name)
            if old is None:
                continue
            new = torch.empty(shape_, dtype=dtype, device=self._device)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    # -- writes during a forward pass -------------------------------------------------------------
    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [T, Hkv, D] keys/values at ``start``; return [Hkv, S, D] views of everything up to them
        (quantized: the rows are stored as codes and scales, and what returns is their dequantized copy)."""
        end = start + k.shape[0]
        if self.k_scale is None or self.v_scale is None:
            self.k[layer, :, start:end] = k.transpose(0, 1)
            self.v[layer, :, start:end] = v.transpose(0, 1)
            return self.k[layer, :, :end], self.v[layer, :, :end]
        for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            c, sc = quantize(x.transpose(0, 1), self._code)
            codes[layer, :, start:end] = c
            scales[layer, :, start:end] = sc
        return self.layer_kv(layer, end)

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

        Moved keys are re-rotated by ``-(end - start)`` (RoPE); models without RoPE (ALiBi) need none. On a
        quantized cache the moved keys are dequantized (float32), re-rotated and quantized again; values move
        as codes and scales, unchanged.
        """
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"cannot drop [{start}, {end}) from a slot of {self.length} tokens")
        delta = end - start
        if delta == 0:
            return
        n = self.length
        moved = n - end
        if moved:
            if self.k_scale is not None and self.v_scale is not None:
                per_layer = getattr(self.rotary, "per_layer", None)   # Gemma 3: each layer's own frequencies
                for layer in range(self._shape[0]):   # one layer at a time: the float32 keys stay small
                    codes, sc = self.k[layer, :, end:n].clone(), self.k_scale[layer, :, end:n].clone()
                    if self.rotary is not None:
                        rot = self.rotary if per_layer is None else per_layer[layer]
                        codes, sc = quantize(rot.shift(dequantize(codes, sc, torch.float32), -delta), self._code)
                    self.k[layer, :, start : start + moved] = codes
                    self.k_scale[layer, :, start : start + moved] = sc
                self.v_scale[:, :, start : start + moved] = self.v_scale[:, :, end:n].clone()
            else:
                k = self.k[:, :, end:n].clone()
                if self.rotary is not None:
                    k = self.rotary.shift(k, -delta)
                self.k[:, :, start : start + moved] = k
            self.v[:, :, start : start + moved] = self.v[:, :, end:n].clone()
        del self.tokens[start:end]

    def reset(self) -> None:
        """Forget every token (storage is kept for reuse)."""
        self.tokens.clear()
