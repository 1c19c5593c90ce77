"""Weight-only quantizers: a float [N, K] matrix -> a :class:`~chatcore.quant.packed.PackedWeight`.

Modes (``v`` is what :func:`chatcore.quant.packed.dequantize` gives back for a weight ``w``):

- ``"int8"``: per output row, symmetric: ``d = max|w| / 127`` (float32), codes ``round(w / d)`` in -127..127.
  Bound: ``|w - v| <= d / 2`` (plus the float32 rounding of ``d * code``, a relative 2^-24).
- ``"int4"``: per group of ``group`` (32, 64 or 128) columns of a row, asymmetric, Q4_1's formula
  ``v = d * code + m`` with float16 ``d`` and ``m`` and codes 0..15. The round-to-nearest candidate takes
  ``m`` = the group's minimum rounded down to float16 and ``d`` = (max - m) / 15 rounded up to float16, so
  [m, m + 15 d] covers the group and each ``|w - v| <= d_rtn / 2``. A few narrower ranges, each also refitted
  by least squares, are tried as well; one replaces it only if the group's squared error is strictly lower and
  no element errs by more than ``d_rtn``. So: per group, the sum of squared errors is at most
  round-to-nearest's, and every ``|w - v| <= d_rtn``. A group of values ``m + d * k`` (float16 ``m``, ``d``,
  integers k with 0 and 15 among them, computed in float32) comes back exactly.
- ``"fp8"``: per output row, ``d = max|w| / 448`` (float32), float8 e4m3 codes ``w / d`` (round to nearest
  even). Bound: ``|w - v| <= max(|w| / 16, d * 2^-10)`` (3 mantissa bits; the second term for e4m3's subnormal
  codes), plus float32 rounding. Needs a GPU with fp8 (compute capability 8.9 or later) or the CPU.

Values must be finite and (for int4) within float16's range. A matrix whose K does not fit the layout
(a multiple of 32, and of ``group`` for int4) raises ``ValueError``. Loading asks :func:`fit_group` first: an
int4 matrix whose K is a multiple of 32 but not of the asked group takes the largest smaller group that divides K
(a 576-column projection asked for groups of 128 gets 64), so it is quantized rather than left in float.
"""

from __future__ import annotations

import torch

from chatcore.errors import LoadOptionError
from chatcore.quant.packed import PackedWeight, QuantFormat, packed_nbytes

__all__ = ["GROUPS", "MODES", "check_device", "fit_group", "quant_format", "quantize", "quantized_nbytes"]

MODES = ("int8", "int4", "fp8")
GROUPS = (32, 64, 128)
FP8_MAX = 448.0
_CHUNK = 1 << 22          # elements of one int4 step (the search's scratch is a few times this)
# int4's candidate ranges besides round-to-nearest: (share of the range cut at the bottom, at the top)
_SHRINK = ((0.05, 0.0), (0.0, 0.05), (0.05, 0.05), (0.1, 0.1))


def quant_format(mode: str, k: int, group: int = 64) -> QuantFormat:
    """The format ``quantize`` gives a matrix of ``k`` columns (int8 and fp8: one block per row)."""
    if mode == "int8":
        return QuantFormat("int8", bits=8, group=k, block=k)
    if mode == "fp8":
        return QuantFormat("fp8", bits=8, group=k, block=k, float_codes=True)
    if mode == "int4":
        if group not in GROUPS:
            raise ValueError(f"int4 groups are {', '.join(map(str, GROUPS))} columns, not {group}")
        return QuantFormat(f"int4_g{group}", bits=4, group=group, block=group, offset="min")
    raise ValueError(f"unknown quantization {mode!r}; use one of {', '.join(MODES)}")


def fit_group(k: int, group: int) -> int:
    """The int4 group a matrix of ``k`` columns is quantized with when ``group`` is asked: the largest of
    :data:`GROUPS` that is at most ``group`` and divides ``k`` (ValueError: ``k`` is not a multiple of 32)."""
    if group not in GROUPS:
        raise ValueError(f"int4 groups are {', '.join(map(str, GROUPS))} columns, not {group}")
    fits = [g for g in GROUPS if g <= group and k % g == 0]
    if not fits:
        raise ValueError(f"int4: {k} columns are not a multiple of 32")
    return max(fits)


def quantized_nbytes(shape: tuple[int, int], mode: str, group: int = 64) -> int:
    """Bytes ``quantize`` makes of a matrix of ``shape`` (ValueError where it cannot)."""
    return packed_nbytes(quant_format(mode, shape[1], group), shape, 2 if mode == "int4" else 4)


def check_device(mode: str, device: torch.device) -> None:
    """:class:`LoadOptionError` where ``device`` cannot run ``mode`` (fp8 on a GPU before compute capability 8.9)."""
    if mode == "fp8" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise LoadOptionError(f"quantize='fp8' needs a GPU with fp8 (compute capability 8.9+, e.g. Ada, Hopper); "
                                  f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use int8 or int4")


def quantize(w: torch.Tensor, mode: str, group: int = 64) -> PackedWeight:
    """``w`` [N, K] (any float dtype) quantized by ``mode`` (see the module docstring), on ``w``'s device."""
    if w.ndim != 2:
        raise ValueError(f"quantize takes a matrix, got shape {list(w.shape)}")
    n, k = w.shape
    fmt = quant_format(mode, k, group)
    if k % 32 or k % fmt.block:
        unit = 32 if mode != "int4" else max(32, group)
        raise ValueError(f"{fmt.name}: {k} columns are not a multiple of {unit}")
    x = w.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{fmt.name}: the matrix holds inf or nan")
    if mode == "int4":
        return PackedWeight(fmt, (n, k), **_int4(x, group))
    amax = x.abs().amax(dim=1, keepdim=True)
    if mode == "int8":
        d = amax / 127
        q = torch.where(d > 0, x / d, 0.0).round().clamp(-127, 127).to(torch.int8)
    else:
        d = amax / FP8_MAX
        q = torch.where(d > 0, x / d, 0.0).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return PackedWeight(fmt, (n, k), q=q, d=d)


def _f16_next(h: torch.Tensor, up: bool) -> torch.Tensor:
    """The float16 next to finite ``h`` towards +inf (``up``) or -inf, from its bits (sign and magnitude)."""
    bits = h.view(torch.int16).to(torch.int32) & 0xFFFF
    mag, neg = bits & 0x7FFF, bits >= 0x8000
    away = neg != up                                  # the step grows the magnitude
    step = torch.where(away, mag + 1, mag - 1)
    zero = mag == 0                                   # +-0: the smallest subnormal of the step's sign
    out = torch.where(zero, torch.full_like(bits, 1 if up else 0x8001), step | (bits & 0x8000))
    return _as_f16(out)


def _as_f16(bits: torch.Tensor) -> torch.Tensor:
    """int32 holding float16 bit patterns 0..0xFFFF -> those float16 values."""
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.float16)


def _f16_down(t: torch.Tensor) -> torch.Tensor:
    """float32 -> the largest float16 <= it."""
    h = t.to(torch.float16)
    return torch.where(h.float() > t, _f16_next(h, up=False), h)


def _f16_up(t: torch.Tensor) -> torch.Tensor:
    """float32 -> the smallest float16 >= it."""
    h = t.to(torch.float16)
    return torch.where(h.float() < t, _f16_next(h, up=True), h)


def _codes(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest codes 0..15 of groups ``x`` [..., g] for float16 ``d``, ``m`` [..., 1] (float32 codes)."""
    df = d.float()
    return torch.where(df > 0, (x - m.float()) / df, 0.0).round().clamp(0, 15)


def _errors(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return d.float() * q + m.float() - x           # the dequantize formula's order: d * code, then + m


def _int4(x: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    n, k = x.shape
    out_q = torch.empty((n, k), dtype=torch.uint8, device=x.device)
    out_d = torch.empty((n, k // group), dtype=torch.float16, device=x.device)
    out_m = torch.empty_like(out_d)
    step = max(1, _CHUNK // k)
    for r in range(0, n, step):
        g = x[r : r + step].reshape(-1, k // group, group)
        q, d, m = _int4_groups(g)
        out_q[r : r + step] = q.reshape(-1, k).to(torch.uint8)
        out_d[r : r + step], out_m[r : r + step] = d.squeeze(2), m.squeeze(2)
    low = out_q.reshape(n, k // 32, 32)
    ql = (low[..., :16] | (low[..., 16:] << 4)).reshape(n, k // 2)
    return {"ql": ql, "d": out_d, "m": out_m}


def _int4_groups(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, d and m of groups ``g`` [..., size]: round-to-nearest, or a search candidate where it is better."""
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    m = _f16_down(lo)
    d = _f16_up((hi - m.float()) / 15)
    q = _codes(g, d, m)
    err = _errors(g, d, m, q)
    best, step = err.square().sum(dim=-1, keepdim=True), d.float()
    span = hi - lo
    for cut_lo, cut_hi in _SHRINK:
        c_lo, c_hi = lo + cut_lo * span, hi - cut_hi * span
        cm = c_lo.to(torch.float16)
        cd = ((c_hi - cm.float()) / 15).to(torch.float16)
        cq = _codes(g, cd, cm)
        for _ in range(2):              # the candidate, then its least-squares refit (d, m for those codes)
            e = _errors(g, cd, cm, cq)
            sse = e.square().sum(dim=-1, keepdim=True)
            take = (sse < best) & (e.abs().amax(dim=-1, keepdim=True) <= step)
            best = torch.where(take, sse, best)
            q, d, m = torch.where(take, cq, q), torch.where(take, cd, d), torch.where(take, cm, m)
            cd, cm = _refit(g, cq)
            cq = _codes(g, cd, cm)
    return q, d, m


def _refit(g: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float16 d, m minimising sum (d q + m - g)^2 for codes ``q`` (m = mean where the codes are constant)."""
    size = g.shape[-1]
    sq, sx = q.sum(-1, keepdim=True), g.sum(-1, keepdim=True)
    sqq, sqx = (q * q).sum(-1, keepdim=True), (q * g).sum(-1, keepdim=True)
    det = size * sqq - sq * sq
    d = torch.where(det > 0, (size * sqx - sq * sx) / torch.where(det > 0, det, 1.0), 0.0).clamp(min=0)
    m = (sx - d * sq) / size
    return d.to(torch.float16), m.to(torch.float16)
