"""Rotary position embedding: cos/sin tables built once for the whole window, indexed in forward.

Keys are stored in the KV cache already rotated; :meth:`Rotary.shift` re-rotates cached keys when the
cache drops a span and the tokens after it move to lower positions.

Every scaling type transformers knows, computed as ``transformers.modeling_rope_utils`` computes it:
- ``default``, ``linear``, ``llama3``: fixed frequencies;
- ``yarn``: blended frequencies and an attention factor (mscale) that scales cos and sin, so q.k carries
  it squared; the K-shift uses the plain angles, since stored keys already carry it once;
- ``longrope``: short or long per-frequency factors and an attention factor. transformers picks the long
  factors for a forward pass whose sequence is longer than ``original_max_position_embeddings``; we pick
  once, by the serving window (long when the window is longer than that), so one table serves every
  length. Both agree for any sequence when the window is at most the original length, and for sequences
  longer than it when the window is too;
- ``dynamic`` (NTK): transformers recomputes the base for every forward pass longer than
  ``max_position_embeddings`` (``base * (factor * len / max_pos - (factor - 1)) ** (dim / (dim - 2))``).
  That would leave cached keys rotated with stale frequencies, so we compute the table **once, at load,
  for the serving window** (``len`` = the window) and keep it. Within ``max_position_embeddings`` that is
  the plain table, exactly as transformers; a window beyond it (allowed up to factor x
  max_position_embeddings) gets the base transformers would use at the window's full length, for every
  position.
"""

from __future__ import annotations

import math

import torch

from chatcore.config import ModelConfig
from chatcore.errors import ModelFormatError
from chatcore.layers.norm import use_fused


def _default_inv_freq(base: float, dim: int, device: torch.device) -> torch.Tensor:
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    return 1.0 / (base**exponent)


def _llama3_inv_freq(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    s = cfg.rope_scaling
    factor = s.factor
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _dynamic_inv_freq(cfg: ModelConfig, seq_len: int, device: torch.device) -> torch.Tensor:
    dim, max_pos, factor = cfg.head_dim, cfg.max_position_embeddings, cfg.rope_scaling.factor
    seq_len = max(seq_len, max_pos)
    base = cfg.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(base, dim, device)


def _yarn_inv_freq(cfg: ModelConfig, device: torch.device) -> tuple[torch.Tensor, float]:
    s, dim, base = cfg.rope_scaling, cfg.head_dim, cfg.rope_theta
    factor = s.factor
    original = int(s.get("original_max_position_embeddings", cfg.max_position_embeddings))

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate (low ones)
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _longrope_inv_freq(cfg: ModelConfig, seq_len: int, device: torch.device) -> tuple[torch.Tensor, float]:
    s, dim = cfg.rope_scaling, cfg.head_dim
    original = int(s.get("original_max_position_embeddings", cfg.max_position_embeddings))
    factor = s.factor
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    factors = s.get("long_factor") if seq_len > original else s.get("short_factor")
    if factors is None or len(factors) != dim // 2:
        raise ModelFormatError(f"longrope scaling needs short_factor and long_factor lists of {dim // 2} numbers")
    ext = torch.tensor(factors, dtype=torch.float32, device=device)
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (ext * cfg.rope_theta**shape), float(attention_factor)


def rope_inv_freq(cfg: ModelConfig, device: torch.device, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling factor for the config's RoPE scaling type, for a
    table serving ``seq_len`` positions (default: max_position_embeddings; it matters to dynamic and
    longrope only)."""
    seq_len = seq_len or cfg.max_position_embeddings
    inv_freq = _default_inv_freq(cfg.rope_theta, cfg.head_dim, device)
    kind = cfg.rope_scaling.kind
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / cfg.rope_scaling.factor, 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, cfg), 1.0
    if kind == "dynamic":
        return _dynamic_inv_freq(cfg, seq_len, device), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(cfg, device)
    if kind == "longrope":
        return _longrope_inv_freq(cfg, seq_len, device)
    raise ModelFormatError(f"RoPE scaling type {kind!r} is not supported (supported: default, linear, dynamic, "
                           "yarn, llama3, longrope)")


class Rotary:
    """Precomputed cos/sin tables ([positions, head_dim/2], float32) for one model and window."""

    def __init__(self, cfg: ModelConfig, max_positions: int, device: torch.device) -> None:
        self.inv_freq, self.attention_scaling = rope_inv_freq(cfg, device, max_positions)
        t = torch.arange(max_positions, device=device, dtype=torch.int64).to(torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        self.cos = freqs.cos() * self.attention_scaling
        self.sin = freqs.sin() * self.attention_scaling
        self.max_positions = max_positions
        self._full: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def full_tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cos/sin tables [positions, head_dim/2] in ``dtype`` (made once per dtype)."""
        if dtype not in self._full:
            self._full[dtype] = (self.cos.to(dtype).contiguous(), self.sin.to(dtype).contiguous())
        return self._full[dtype]

    def tables(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for positions ``start .. start+length-1``, shaped to broadcast over heads."""
        end = start + length
        if end > self.max_positions:
            raise ValueError(f"position {end - 1} is beyond the rotary table ({self.max_positions})")
        return self.cos[start:end, None, :].to(dtype), self.sin[start:end, None, :].to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [T, H, D] (half-split layout, as transformers' ``rotate_half``) by cos/sin [T or 1, 1, D/2].

        Half-precision prompt chunks on a GPU take one fused kernel (:func:`chatcore.layers.triton_fused.rotate`),
        which rounds once where the plain ops round after each product: a last-bit difference."""
        if x.dim() == 3 and x.shape[0] > 1 and cos.shape[0] == x.shape[0] and use_fused(x):
            from chatcore.layers.triton_fused import rotate

            return rotate(x, cos.reshape(x.shape[0], -1), sin.reshape(x.shape[0], -1))
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def shift(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Keys rotated for position p, re-rotated for position p + delta (delta < 0 moves them back).

        Uses the plain angles (no attention scaling), which the stored keys already carry once.
        """
        angle = self.inv_freq * float(delta)
        cos = angle.cos()[None, None, :].to(keys.dtype)
        sin = angle.sin()[None, None, :].to(keys.dtype)
        return self.apply(keys, cos, sin)
