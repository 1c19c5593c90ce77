"""GGUF quantized rows -> :class:`~chatcore.quant.packed.PackedWeight`, losslessly, with torch ops.

:func:`pack_gguf` takes a tensor's GGUF bytes as a uint8 tensor [N, bytes per row] (on any device: moved to the
GPU first, the whole repack runs there) and moves its codes and scales into the planar layout without changing
a bit: float16 scales are reinterpreted, never converted, so :func:`chatcore.quant.packed.dequantize` of the
result equals ``gguf.quants.dequantize`` of the bytes bit for bit in float32 (the same operations in the same
order; see the layout's module docstring). Every step works on whole tensors (no loop over blocks).

The GGUF block layouts (``gguf.quants``, after llama.cpp's ``ggml-quants``), per block:
- Q4_0 [d f16, qs 16]; Q4_1 [d, m, qs 16]; Q5_0 [d, qh 4, qs 16]; Q5_1 [d, m, qh 4, qs 16]; Q8_0 [d, q 32 int8]
  (32 columns; qs byte j: column j low nibble, j + 16 high; qh bit j: bit 4 of column j);
- Q4_K [d, dmin, scales 12, qs 128]; Q5_K [d, dmin, scales 12, qh 32, qs 128] (256 columns, 8 sub-blocks of 32
  with 6-bit scale and min; qs chunk c of 32 bytes: sub-block 2c in the low nibbles, 2c + 1 in the high;
  qh byte j bit b: bit 4 of column 32 b + j);
- Q6_K [ql 128, qh 64, scales 16 int8, d] (256 columns, 16 sub-blocks of 16; per half h of 128 columns, ql
  bytes 64 h + j: column j low nibble, j + 64 high; qh bytes 32 h + j: bits 2 s .. 2 s + 1 are bits 4-5 of
  column 32 s + j).
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from chatcore.quant.packed import PackedWeight, QuantFormat, packed_nbytes

__all__ = ["FORMATS", "PACKABLE", "pack_gguf", "packed_size"]

Q = GGMLQuantizationType

FORMATS: dict[GGMLQuantizationType, QuantFormat] = {
    Q.Q4_0: QuantFormat("q4_0", bits=4, group=32, block=32, zero=8),
    Q.Q4_1: QuantFormat("q4_1", bits=4, group=32, block=32, offset="min"),
    Q.Q5_0: QuantFormat("q5_0", bits=5, group=32, block=32, zero=16),
    Q.Q5_1: QuantFormat("q5_1", bits=5, group=32, block=32, offset="min"),
    Q.Q8_0: QuantFormat("q8_0", bits=8, group=32, block=32),
    Q.Q4_K: QuantFormat("q4_k", bits=4, group=32, block=256, sub_scale=True, offset="dmin"),
    Q.Q5_K: QuantFormat("q5_k", bits=5, group=32, block=256, sub_scale=True, offset="dmin"),
    Q.Q6_K: QuantFormat("q6_k", bits=6, group=16, block=256, zero=32, sub_scale=True),
}
PACKABLE = frozenset(FORMATS)


def packed_size(qtype: GGMLQuantizationType, shape: tuple[int, int]) -> int:
    """Bytes a [N, K] tensor of ``qtype`` takes once packed (from the shape alone)."""
    return packed_nbytes(FORMATS[qtype], shape)


def pack_gguf(raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> PackedWeight:
    """The packed form of GGUF rows ``raw`` (uint8 [N, bytes per row], rows in the order wanted) of a [N, K]
    tensor of type ``qtype`` (one of :data:`PACKABLE`), on ``raw``'s device; planes own their memory."""
    if qtype not in FORMATS:
        raise ValueError(f"GGUF type {qtype.name} has no packed layout")
    n, k = shape
    block, size = GGML_QUANT_SIZES[qtype]
    if raw.dtype != torch.uint8 or raw.ndim != 2 or k % block or tuple(raw.shape) != (n, k // block * size):
        raise ValueError(f"{qtype.name} rows for a [{n}, {k}] tensor are uint8 [{n}, {k // block * size}], "
                         f"got {raw.dtype} {list(raw.shape)}")
    b = raw.reshape(n, k // block, size)
    fmt = FORMATS[qtype]
    return PackedWeight(fmt, (n, k), **_PACKERS[qtype](b, n, k))


Planes = dict[str, torch.Tensor]


def _own(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as a compact [n, -1] tensor of its own (never a view into the file's bytes)."""
    return t.clone(memory_format=torch.contiguous_format).reshape(n, -1)


def _f16(b: torch.Tensor, at: int, n: int) -> torch.Tensor:
    """The float16 field at byte ``at`` of every block, as [n, blocks] (the bits reinterpreted, not converted)."""
    return _own(b[:, :, at : at + 2], n).view(torch.float16).reshape(n, -1)


def _halves(low: torch.Tensor, n: int) -> torch.Tensor:
    """4-bit codes [..., 32] per group of 32 columns -> the ``ql`` bytes: byte j = column j | column j + 16 << 4."""
    return _own(low[..., :16] | (low[..., 16:] << 4), n)


def _bits_to_qh(high: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """High code bits [n, K] (``width`` bits each) -> the ``qh`` plane: 8 // width columns per byte, column e at
    bits ``width * (e % per)``."""
    per = 8 // width
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=high.device)
    return (high.reshape(n, -1, per) << shifts).sum(dim=2, dtype=torch.uint8)


def _q4_legacy(b: torch.Tensor, n: int, k: int, with_min: bool) -> Planes:
    at = 4 if with_min else 2
    planes = {"d": _f16(b, 0, n), "ql": _own(b[:, :, at : at + 16], n)}
    if with_min:
        planes["m"] = _f16(b, 2, n)
    return planes


def _q5_legacy(b: torch.Tensor, n: int, k: int, with_min: bool) -> Planes:
    at = 4 if with_min else 2
    planes = {"d": _f16(b, 0, n), "qh": _own(b[:, :, at : at + 4], n), "ql": _own(b[:, :, at + 4 : at + 20], n)}
    if with_min:
        planes["m"] = _f16(b, 2, n)
    return planes


def _q8_0(b: torch.Tensor, n: int, k: int) -> Planes:
    return {"d": _f16(b, 0, n), "q": _own(b[:, :, 2:34], n).view(torch.int8)}


def _k_scales(s: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 scale bytes of Q4_K / Q5_K blocks [n, blocks, 12] -> 6-bit scales and mins [n, blocks * 8]: bytes
    0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for the mins; bytes
    8-11 the low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble)."""
    lo_d, lo_m, mix = s[:, :, 0:4], s[:, :, 4:8], s[:, :, 8:12]
    sc = torch.cat([lo_d & 0x3F, (mix & 0x0F) | ((lo_d >> 2) & 0x30)], dim=2)
    mn = torch.cat([lo_m & 0x3F, (mix >> 4) | ((lo_m >> 2) & 0x30)], dim=2)
    return _own(sc, n), _own(mn, n)


def _k_low(qs: torch.Tensor, n: int) -> torch.Tensor:
    """Q4_K / Q5_K qs [n, blocks, 128] -> the ``ql`` plane: chunk c's low nibbles are sub-block 2c, its high
    nibbles sub-block 2c + 1."""
    chunks = qs.reshape(n, -1, 4, 1, 32)
    low = torch.cat([chunks & 0x0F, chunks >> 4], dim=3)          # [n, blocks, 4, 2, 32]: sub-block 2c + h
    return _halves(low, n)


def _k4(b: torch.Tensor, n: int, k: int, five: bool) -> Planes:
    sc, mn = _k_scales(b[:, :, 4:16], n)
    planes = {"d": _f16(b, 0, n), "dmin": _f16(b, 2, n), "sc": sc, "mn": mn}
    at = 16
    if five:
        qh = b[:, :, 16:48].reshape(n, -1, 1, 32)
        bits = (qh >> torch.arange(8, dtype=torch.uint8, device=b.device).reshape(8, 1)) & 1   # [n, blocks, 8, 32]
        planes["qh"] = _bits_to_qh(bits.reshape(n, k), 1, n)
        at = 48
    planes["ql"] = _k_low(b[:, :, at : at + 128], n)
    return planes


def _q6_k(b: torch.Tensor, n: int, k: int) -> Planes:
    ql = b[:, :, 0:128].reshape(n, -1, 2, 1, 64)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=3)                  # [n, blocks, half, nibble, 64]
    qh = b[:, :, 128:192].reshape(n, -1, 2, 1, 32)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=b.device).reshape(4, 1)
    high = (qh >> shifts) & 0x03                                  # [n, blocks, half, 4, 32]: column 32 s + j
    return {"d": _f16(b, 208, n), "sc": _own(b[:, :, 192:208], n).view(torch.int8),
            "ql": _halves(low.reshape(n, -1, 32), n), "qh": _bits_to_qh(high.reshape(n, k), 2, n)}


_PACKERS = {
    Q.Q4_0: lambda b, n, k: _q4_legacy(b, n, k, False),
    Q.Q4_1: lambda b, n, k: _q4_legacy(b, n, k, True),
    Q.Q5_0: lambda b, n, k: _q5_legacy(b, n, k, False),
    Q.Q5_1: lambda b, n, k: _q5_legacy(b, n, k, True),
    Q.Q8_0: _q8_0,
    Q.Q4_K: lambda b, n, k: _k4(b, n, k, False),
    Q.Q5_K: lambda b, n, k: _k4(b, n, k, True),
    Q.Q6_K: _q6_k,
}
