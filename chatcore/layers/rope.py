"""Rotary position embedding: cos/sin tables built once for the whole window, indexed in forward.

Keys are stored in the KV cache already rotated; :meth:`Rotary.shift` re-rotates cached keys when the
cache drops a span and the tokens after it move to lower positions.
"""

from __future__ import annotations

import math

import torch

from chatcore.config import ModelConfig
from chatcore.errors import ModelFormatError


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


def rope_inv_freq(cfg: ModelConfig, device: torch.device) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling factor for the config's RoPE scaling type."""
    inv_freq = _default_inv_freq(cfg.rope_theta, cfg.head_dim, device)
    kind = cfg.rope_scaling.kind
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / cfg.rope_scaling.factor, 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, cfg), 1.0
    raise ModelFormatError(f"RoPE scaling type {kind!r} is not supported yet (supported: default, linear, llama3)")


class Rotary:
    """Precomputed cos/sin tables ([positions, head_dim/2], float32) for one model and window."""

    def __init__(self, cfg: ModelConfig, max_positions: int, device: torch.device) -> None:
        self.inv_freq, self.attention_scaling = rope_inv_freq(cfg, device)
        t = torch.arange(max_positions, device=device, dtype=torch.int64).to(torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        self.cos = freqs.cos() * self.attention_scaling
        self.sin = freqs.sin() * self.attention_scaling
        self.max_positions = max_positions

    def tables(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for positions ``start .. start+length-1``, shaped to broadcast over heads."""
        end = start + length
        if end > self.max_positions:
            raise ValueError(f"position {end - 1} is beyond the rotary table ({self.max_positions})")
        return self.cos[start:end, None, :].to(dtype), self.sin[start:end, None, :].to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [T, H, D] (half-split layout, as transformers' ``rotate_half``)."""
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
