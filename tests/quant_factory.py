"""Packed weights for tests (import: ``from quant_factory import ...``): a small test-local quantizer into the
planar layout (:mod:`chatcore.quant.packed`) of a few GGUF-like formats, and a tensor source that serves a
checkpoint's matrices packed (or as their dequantized values, the reference model's weights).

The quantizer only has to make valid codes and scales of about the weights' size: every test compares a model
run on the packed weights with one run on ``dequantize`` of the same packed weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from chatcore.quant.packed import PackedWeight, QuantFormat, dequantize

FORMATS = {
    "q8_0": QuantFormat("q8_0", bits=8, group=32, block=32),
    "q4_1": QuantFormat("q4_1", bits=4, group=32, block=32, offset="min"),
    "q5_0": QuantFormat("q5_0", bits=5, group=32, block=32, zero=16),
    "q4_k": QuantFormat("q4_k", bits=4, group=32, block=256, sub_scale=True, offset="dmin"),
    "q6_k": QuantFormat("q6_k", bits=6, group=16, block=256, zero=32, sub_scale=True),
}


def pack_codes(c: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Integer codes [N, K] (0 .. 2**bits - 1) -> the ql (and qh) planes."""
    n, k = c.shape
    c = c.to(torch.int32)
    low = (c & 0x0F).view(n, k // 32, 2, 16)
    out = {"ql": (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, k // 2).to(torch.uint8)}
    if bits > 4:
        width = bits - 4
        per = 8 // width
        high = ((c >> 4) & ((1 << width) - 1)).view(n, k // per, per)
        shifts = torch.arange(per, dtype=torch.int32) * width
        out["qh"] = (high << shifts).sum(-1).to(torch.uint8)
    return out


def quantize(w: torch.Tensor, fmt: QuantFormat) -> PackedWeight:
    """``w`` [N, K] (float) packed in ``fmt`` (round to nearest; not llama.cpp's search, nor bit-exact to it)."""
    w = w.float()
    n, k = w.shape
    g, b = fmt.group, fmt.block
    levels = (1 << fmt.bits) - 1
    if fmt.bits == 8:
        d = (w.view(n, k // b, b).abs().amax(-1) / 127).clamp_min(1e-8).half()
        q = (w / d.float().repeat_interleave(b, 1)).round().clamp(-127, 127).to(torch.int8)
        return PackedWeight(fmt, (n, k), q=q, d=d)
    groups = w.view(n, k // g, g)
    if fmt.offset == "min":
        lo, hi = groups.amin(-1), groups.amax(-1)
        d = ((hi - lo) / levels).clamp_min(1e-8).half()
        m = lo.half()
        codes = ((groups - m.float()[..., None]) / d.float()[..., None]).round().clamp(0, levels)
        return PackedWeight(fmt, (n, k), d=d, m=m, **pack_codes(codes.view(n, k), fmt.bits))
    if fmt.offset == "dmin":   # v = d * sc * code - dmin * mn, per group of g inside blocks of b
        lo = groups.amin(-1).clamp(max=0)
        scale = (groups.amax(-1) - lo) / levels
        per_block = k // b
        d = (scale.view(n, per_block, -1).amax(-1) / 63).clamp_min(1e-8).half()
        dmin = ((-lo).view(n, per_block, -1).amax(-1) / 63).clamp_min(1e-8).half()
        reps = b // g
        sc = (scale / d.float().repeat_interleave(reps, 1)).round().clamp(1, 63).to(torch.uint8)
        mn = (-lo / dmin.float().repeat_interleave(reps, 1)).round().clamp(0, 63).to(torch.uint8)
        a = d.float().repeat_interleave(reps, 1) * sc.float()
        off = dmin.float().repeat_interleave(reps, 1) * mn.float()
        codes = ((groups + off[..., None]) / a[..., None]).round().clamp(0, levels)
        return PackedWeight(fmt, (n, k), d=d, sc=sc, dmin=dmin, mn=mn, **pack_codes(codes.view(n, k), fmt.bits))
    half = fmt.zero - 1 if fmt.zero else levels
    amax = groups.abs().amax(-1)
    if fmt.sub_scale:   # int8 sub-scales under a per-block d
        scale = amax / half
        d = (scale.view(n, k // b, -1).amax(-1) / 127).clamp_min(1e-8).half()
        sc = (scale / d.float().repeat_interleave(b // g, 1)).round().clamp(1, 127).to(torch.int8)
        a = d.float().repeat_interleave(b // g, 1) * sc.float()
        extra = {"sc": sc}
    else:
        d = (amax / half).clamp_min(1e-8).half()
        a = d.float()
        extra = {}
    codes = (groups / a[..., None]).round().clamp(-fmt.zero, levels - fmt.zero) + fmt.zero
    return PackedWeight(fmt, (n, k), d=d, **extra, **pack_codes(codes.view(n, k), fmt.bits))


Plan = Callable[[str, tuple[int, ...]], str | None]   # (name, shape) -> a FORMATS key, or None: keep dense


def every_matrix(fmt: str, **by_suffix: str) -> Plan:
    """Pack every 2-d tensor whose width the format's block divides in ``fmt``; names ending in a key of
    ``by_suffix`` (dots as underscores are not needed: ``v_proj``) in that key's format instead."""
    def plan(name: str, shape: tuple[int, ...]) -> str | None:
        chosen = next((f for suffix, f in by_suffix.items() if f"{suffix}." in name), fmt)
        return chosen if len(shape) == 2 and shape[1] % FORMATS[chosen].block == 0 else None

    return plan


class PackedSource:
    """A tensor source over ``source``: the tensors ``plan`` names packed (``dense``: their dequantized float32
    values instead), the rest as they are."""

    def __init__(self, source, plan: Plan, *, dense: bool = False) -> None:  # noqa: ANN001
        self.source, self.plan, self.dense = source, plan, dense
        self.packed: dict[str, PackedWeight] = {}

    def names(self) -> set[str]:
        return self.source.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def get(self, name: str) -> torch.Tensor | PackedWeight:
        t = self.source.get(name)
        fmt = self.plan(name, tuple(t.shape))
        if fmt is None:
            return t
        pw = self.packed.get(name)
        if pw is None:
            pw = self.packed[name] = quantize(t, FORMATS[fmt])
        return dequantize(pw) if self.dense else pw


def opened_packed(path: Path, plan: Plan, *, dense: bool = False):  # noqa: ANN201
    """``open_checked(path)`` with its source served packed (``dense``: dequantized) as ``plan`` says."""
    from chatcore.checkpoint import open_checked

    cfg, source, tokenizer = open_checked(path)
    return cfg, PackedSource(source, plan, dense=dense), tokenizer
