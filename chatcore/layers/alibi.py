"""ALiBi slopes, built once per model, for any head count (the bias itself is added in attention).

Each query at position i adds ``slope[h] * (j - i)`` to its score for key j (0 for itself, more negative
the further back). The reference implementations add ``slope * j`` (BLOOM) or ``slope * (j - S + 1)``
(MPT) instead: those differ from ours by a constant per query row, which softmax ignores.

Head counts that are not powers of two, two formulations (equal at MPT's default bias max of 8):
- BLOOM (the ALiBi paper's): the slopes of the nearest lower power of two, then every other slope of
  the next power of two;
- MPT: the slopes of the next power of two (with ``alibi_bias_max``), odd entries first, then even ones,
  cut to the head count.
"""

from __future__ import annotations

import math

import torch


def bloom_slopes(num_heads: int) -> torch.Tensor:
    """Slopes [num_heads] (float32) as BLOOM computes them (``transformers`` ``_get_alibi_slopes``)."""
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


def mpt_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> torch.Tensor:
    """Slopes [num_heads] (float32) as MPT computes them (``transformers`` ``build_mpt_alibi_tensor``)."""
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    pow2 = 2 ** math.ceil(math.log2(num_heads))
    base = torch.arange(1, pow2 + 1, dtype=torch.int64).float() * (alibi_bias_max / pow2)
    slopes = 1.0 / torch.pow(2, base)
    if pow2 != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes
