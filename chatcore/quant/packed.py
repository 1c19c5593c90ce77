"""Packed (quantized) weights: one planar layout that every GGUF type and every ``--quantize`` mode maps onto
losslessly, and its reference dequantization.

A :class:`PackedWeight` is a matrix [N, K] (rows: outputs, columns: inputs, as ``F.linear`` takes it) whose rows
are independent: every plane is [N, ...], so a tensor-parallel shard of output rows is a slice of each plane and
fusing q/k/v (or gate/up) rows of one format is a concatenation. Element ``e`` of row ``n`` is

    A = d[n, e // block] * sc[n, e // group]        (float32; the ``* sc`` only with a sub-scale plane)
    v = A * (code[n, e] - zero)                      (the code as a float32 integer)
    v = v + m[n, e // group]                         (offset "min": Q4_1, Q5_1, int4)
    v = v - dmin[n, e // block] * mn[n, e // group]  (offset "dmin": Q4_K, Q5_K)

in float32, in that order: the operations ``gguf.quants`` does for every supported type, so
:func:`dequantize` equals ``gguf.quants.dequantize`` bit for bit.

Codes (the ``bits`` of the format):
- 4, 5, 6 bits: ``ql`` [N, K/2] uint8 holds the low four bits. Per group of 32 columns (16 bytes), byte ``j``
  holds column ``j`` in its low nibble and column ``j + 16`` in its high nibble (Q4_0's own order), so a kernel
  reads a byte and takes x[j] and x[j + 16] with it. 5 and 6 bits add ``qh``: [N, K/8] uint8 (5 bits: bit 4 of
  column ``e`` is bit ``e % 8`` of byte ``e // 8``) or [N, K/4] uint8 (6 bits: bits 4-5 of column ``e`` are
  bits ``2 * (e % 4)`` .. ``+1`` of byte ``e // 4``);
- 8 bits: ``q`` [N, K] int8 (signed codes, ``zero`` 0), or float8_e4m3fn codes (format ``fp8``).

Scales: ``d`` [N, K/block] float16 (GGUF) or float32 (``--quantize``); ``sc`` [N, K/group] uint8 or int8 (the
K-quants' sub-block scales); ``m`` [N, K/group] float16; ``dmin`` [N, K/block] float16 with ``mn`` [N, K/group]
uint8. ``block`` is a multiple of ``group``; K is a multiple of ``block`` and of 32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

PLANES = ("ql", "qh", "q", "d", "sc", "m", "dmin", "mn")


@dataclass(frozen=True)
class QuantFormat:
    """How a packed weight's codes and scales combine (see the module docstring)."""

    name: str                   # "q4_k", "int4_g64", "fp8", ...: what reports and errors call it
    bits: int                   # 4, 5, 6 or 8
    group: int                  # columns sharing a sub-scale (sc) or an offset (m / mn); = block without them
    block: int                  # columns sharing d (and dmin)
    zero: int = 0               # subtracted from each code
    sub_scale: bool = False     # an sc plane multiplies d
    offset: str | None = None   # None, "min" (m added) or "dmin" (dmin * mn subtracted)
    float_codes: bool = False   # 8-bit float (e4m3) codes rather than integers

    def __post_init__(self) -> None:
        if self.bits not in (4, 5, 6, 8):
            raise ValueError(f"{self.name}: {self.bits}-bit codes are not a packed layout")
        if self.block % self.group or self.group <= 0:
            raise ValueError(f"{self.name}: block {self.block} is not a multiple of group {self.group}")
        if self.offset not in (None, "min", "dmin"):
            raise ValueError(f"{self.name}: unknown offset {self.offset!r}")
        if self.float_codes and self.bits != 8:
            raise ValueError(f"{self.name}: float codes are 8-bit")

    @property
    def bits_per_weight(self) -> float:
        """Bytes per weight x 8, scales included (what a row of K columns costs / K), for float16 d."""
        per = self.bits + 16 / self.block
        if self.sub_scale:
            per += 8 / self.group
        if self.offset == "min":
            per += 16 / self.group
        elif self.offset == "dmin":
            per += 8 / self.group + 16 / self.block
        return per


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A packed [N, K] matrix: its format and planes (the ones the format uses; the rest None)."""

    fmt: QuantFormat
    shape: tuple[int, int]
    ql: torch.Tensor | None = None
    qh: torch.Tensor | None = None
    q: torch.Tensor | None = None
    d: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    m: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    mn: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, k = self.shape
        f = self.fmt
        if k % f.block or k % 32:
            raise ValueError(f"{f.name}: {k} columns are not a multiple of {max(f.block, 32)}")
        want: dict[str, tuple[int, int]] = {"d": (n, k // f.block)}
        if f.bits == 8:
            want["q"] = (n, k)
        else:
            want["ql"] = (n, k // 2)
            if f.bits > 4:
                want["qh"] = (n, k * (f.bits - 4) // 8)
        if f.sub_scale:
            want["sc"] = (n, k // f.group)
        if f.offset == "min":
            want["m"] = (n, k // f.group)
        elif f.offset == "dmin":
            want |= {"dmin": (n, k // f.block), "mn": (n, k // f.group)}
        for name in PLANES:
            t = getattr(self, name)
            if (t is None) != (name not in want):
                raise ValueError(f"{f.name}: plane {name} is {'missing' if t is None else 'not used'}")
            if t is not None and tuple(t.shape) != want[name]:
                raise ValueError(f"{f.name}: plane {name} has shape {tuple(t.shape)}, expected {want[name]}")

    # -- what the rest of the engine asks of a weight ----------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.d.device  # type: ignore[union-attr]

    def planes(self) -> dict[str, torch.Tensor]:
        return {name: t for name in PLANES if (t := getattr(self, name)) is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.planes().values())

    def to(self, device: torch.device | str) -> PackedWeight:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.planes().items()})

    def contiguous(self) -> PackedWeight:
        return dataclasses.replace(self, **{k: v.contiguous() for k, v in self.planes().items()})

    def rows(self, start: int, stop: int) -> PackedWeight:
        """Output rows ``start .. stop - 1`` (a column-parallel shard)."""
        return dataclasses.replace(self, shape=(stop - start, self.shape[1]),
                                   **{k: v[start:stop] for k, v in self.planes().items()})

    def columns(self, start: int, stop: int) -> PackedWeight:
        """Input columns ``start .. stop - 1`` (a row-parallel shard); both must lie on a block boundary."""
        f = self.fmt
        unit = max(f.block, 32)
        if start % unit or stop % unit:
            raise ValueError(f"{f.name}: columns {start}..{stop} do not lie on {unit}-column block boundaries")
        k = self.shape[1]
        cut = {name: t[:, start * t.shape[1] // k : stop * t.shape[1] // k] for name, t in self.planes().items()}
        return dataclasses.replace(self, shape=(self.shape[0], stop - start), **cut)


def cat_rows(weights: Sequence[PackedWeight]) -> PackedWeight:
    """Weights of one format stacked by rows (fused q/k/v or gate/up)."""
    first = weights[0]
    if any(w.fmt != first.fmt or w.shape[1] != first.shape[1] for w in weights):
        raise ValueError("cat_rows takes weights of one format and width")
    planes = {name: torch.cat([getattr(w, name) for w in weights]) for name in first.planes()}
    return PackedWeight(first.fmt, (sum(w.shape[0] for w in weights), first.shape[1]), **planes)


def codes(w: PackedWeight) -> torch.Tensor:
    """The integer codes [N, K] (int32, before ``zero`` is subtracted); float codes for fp8 (float32)."""
    n, k = w.shape
    f = w.fmt
    if f.bits == 8:
        return w.q.float() if f.float_codes else w.q.to(torch.int32)  # type: ignore[union-attr]
    ql = w.ql.to(torch.int32).view(n, k // 32, 16)  # type: ignore[union-attr]
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).view(n, k)
    if f.bits == 4:
        return low
    per = 8 // (f.bits - 4)                          # codes per qh byte
    qh = w.qh.to(torch.int32).repeat_interleave(per, dim=1)  # type: ignore[union-attr]
    shift = (torch.arange(k, device=qh.device) % per) * (f.bits - 4)
    high = (qh >> shift) & ((1 << (f.bits - 4)) - 1)
    return low | (high << 4)


def dequantize(w: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] values of ``w``, computed in float32 as the module docstring says, then cast to ``dtype``."""
    f = w.fmt

    def per_col(t: torch.Tensor, size: int) -> torch.Tensor:
        return t.float().repeat_interleave(size, dim=1)

    a = per_col(w.d, f.block)  # type: ignore[arg-type]
    if f.sub_scale:
        a = a * per_col(w.sc, f.group)  # type: ignore[arg-type]
    c = codes(w)
    v = a * (c if f.float_codes else (c - f.zero).float())
    if f.offset == "min":
        v = v + per_col(w.m, f.group)  # type: ignore[arg-type]
    elif f.offset == "dmin":
        v = v - per_col(w.dmin, f.block) * per_col(w.mn, f.group)  # type: ignore[arg-type]
    return v.to(dtype)
