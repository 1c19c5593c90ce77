"""A bench-only experiment: chatcore's CPU projections through fbgemm's int8 dynamic-quantized linear
(``torch.ops.quantized.linear_dynamic``: weights int8 per output channel, packed once; each call quantizes the
activation to int8 and accumulates in int32). Not part of chatcore: :func:`installed` swaps the ``F`` that
``chatcore.layers.linear`` calls for the time of a ``with`` block, so ``bench/cpu_decode.py`` can time a whole
decode with it and ``bench/quant_accuracy.py`` can score it.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F

import chatcore.layers.linear as chatcore_linear


def int8_packed(w: torch.Tensor) -> object:
    """``w`` [out, in] float as fbgemm's packed int8 weight (symmetric, one scale per output row)."""
    wf = w.float().contiguous()
    s = (wf.abs().amax(dim=1).clamp(min=1e-8) / 127).double()
    q = torch.quantize_per_channel(wf, s, torch.zeros_like(s, dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None)


class _Int8F(types.SimpleNamespace):
    def __init__(self) -> None:
        super().__init__()
        self.packed: dict[tuple, object] = {}
        self.per_token = False   # one activation scale per row (as batch-1 decode has) rather than per call

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cpu" or w.dim() != 2 or x.dtype != torch.float32:
            return F.linear(x, w, b)
        key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()))
        p = self.packed.get(key)
        if p is None:
            p = self.packed[key] = int8_packed(w)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        if self.per_token and x2.shape[0] > 1:
            y = torch.cat([torch.ops.quantized.linear_dynamic(r, p, False) for r in x2.split(1)])
        else:
            y = torch.ops.quantized.linear_dynamic(x2, p, False)
        y = y.reshape(*shape[:-1], y.shape[-1])
        return y if b is None else y + b

    def __getattr__(self, name: str) -> object:
        return getattr(F, name)


_SHIM = _Int8F()


@contextlib.contextmanager
def installed(per_token: bool = False) -> Iterator[None]:
    """Every ``chatcore.layers.linear.linear`` on the CPU runs int8 inside the block (weights packed on first use,
    kept for later blocks). The activation is quantized with one scale per call (a prefill chunk shares one), or
    with ``per_token`` one per token, as batch-1 decode quantizes it."""
    chatcore_linear.F = _SHIM  # type: ignore[assignment]
    _SHIM.per_token = per_token
    try:
        yield
    finally:
        chatcore_linear.F = F
        _SHIM.per_token = False
