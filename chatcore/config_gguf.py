"""Reading GGUF metadata, the parts every family shares: keys under ``<general.architecture>.``, the fields
every GGUF file carries, the RoPE and ALiBi settings llama.cpp's converter (``convert_hf_to_gguf.py``)
writes, and Llama 3's RoPE scaling recovered from a ``rope_freqs`` tensor. Each family reads its own keys
with these (``config_from_gguf`` in its file in :mod:`chatcore.models`).

What GGUF does not record is decided by the loader from the tensors present (tied output head, biases).
Llama 3.1 / 3.2 carry their RoPE scaling as a ``rope_freqs`` tensor (a divisor per frequency) computed by
Llama 3's rule; :func:`llama3_scaling` recovers that rule's parameters (taking ``low_freq_factor`` = 1, as
every Llama 3 has) and checks that they give the file's divisors back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from chatcore.config import RopeScaling, as_ids
from chatcore.errors import ModelFormatError, UnsupportedArchitecture

# GGUF `rope.scaling.type` -> transformers' rope_type (llama.cpp writes Llama 3.1's scaling as a rope_freqs tensor).
_ROPE_TYPES = {"none": "default", "linear": "linear", "yarn": "yarn"}


class GGUFKeys:
    """``key("block_count")`` reads ``<arch>.block_count``; a missing key raises KeyError unless a default is given."""

    _MISSING = object()

    def __init__(self, meta: Mapping[str, Any], arch: str) -> None:
        self.meta, self.prefix = meta, f"{arch}."

    def __call__(self, name: str, default: Any = _MISSING) -> Any:
        value = self.meta.get(self.prefix + name)
        if value is None:
            if default is self._MISSING:
                raise KeyError(self.prefix + name)
            return default
        return value


def common_fields(key: GGUFKeys) -> dict[str, Any]:
    """The ``ModelConfig`` fields every GGUF architecture records the same way."""
    meta = key.meta
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    return dict(vocab_size=int(key("vocab_size", None) or len(meta["tokenizer.ggml.tokens"])), hidden_size=hidden,
                num_layers=int(key("block_count")), num_heads=heads,
                max_position_embeddings=int(key("context_length", 2048)),
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_ids=as_ids(meta.get("tokenizer.ggml.eos_token_id")))


def rope_fields(key: GGUFKeys, common: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a RoPE family (Llama-style blocks): MLP width, KV heads, head_dim, RMSNorm eps, RoPE."""
    hidden, heads = common["hidden_size"], common["num_heads"]
    kind = str(key("rope.scaling.type", "none"))
    factor = key("rope.scaling.factor", None)
    if kind not in _ROPE_TYPES:
        raise ModelFormatError(f"GGUF RoPE scaling {kind!r} is not supported (supported in GGUF: "
                               f"{', '.join(_ROPE_TYPES)})")
    rope_type = _ROPE_TYPES[kind] if factor and float(factor) != 1.0 else "default"
    params: tuple[tuple[str, Any], ...] = ()
    if rope_type == "yarn":
        original = key("rope.scaling.original_context_length", None) or key("context_length", 2048)
        params = (("original_max_position_embeddings", int(original)),)
    # head_dim: Qwen3 (and any config with an explicit head_dim) writes key_length; Llama writes rope.dimension_count
    head_dim = key("attention.key_length", None) or key("rope.dimension_count", None) or hidden // heads
    return dict(intermediate_size=int(key("feed_forward_length")),
                num_kv_heads=int(key("attention.head_count_kv", heads)), head_dim=int(head_dim),
                rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(key("rope.freq_base", 10000.0)),
                rope_scaling=RopeScaling(rope_type, float(factor or 1.0) if rope_type != "default" else 1.0, params))


def alibi_fields(key: GGUFKeys, common: Mapping[str, Any], family: str) -> dict[str, Any]:
    """The fields of an ALiBi family (BLOOM, MPT): MLP width, LayerNorm eps; multi-query files are refused."""
    hidden, heads = common["hidden_size"], common["num_heads"]
    kv_heads = int(key("attention.head_count_kv", heads))
    if kv_heads != heads:
        raise UnsupportedArchitecture(f"{family} GGUF with {kv_heads} KV heads for {heads} heads (multi-query "
                                      "attention) is not supported")
    return dict(intermediate_size=int(key("feed_forward_length", 4 * hidden)), num_kv_heads=heads,
                head_dim=hidden // heads, rms_norm_eps=float(key("attention.layer_norm_epsilon", 1e-5)))


def llama3_factors(base: float, head_dim: int, factor: float, low: float, high: float, old: float) -> list[float]:
    """Llama 3's RoPE divisor per frequency (what llama.cpp's converter writes as ``rope_freqs``)."""
    out = []
    for i in range(head_dim // 2):
        wavelen = 2 * math.pi * base ** (2 * i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def llama3_scaling(divisors: Sequence[float], base: float, head_dim: int) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """(factor, params) of Llama 3's RoPE scaling that gives ``divisors`` (a GGUF ``rope_freqs`` tensor).

    The divisors are 1 for short wavelengths, ``factor`` for long ones, and in between
    1 / ((1 - s) / factor + s) with s linear in the frequency; fitting that line gives the thresholds.
    """
    bad = ModelFormatError("GGUF rope_freqs do not follow Llama 3's RoPE scaling rule; not supported")
    if len(divisors) != head_dim // 2:
        raise ModelFormatError(f"GGUF rope_freqs has {len(divisors)} values for head_dim {head_dim}")
    factor = max(divisors)
    if factor <= 1.0:
        raise bad
    points = []
    for i, d in enumerate(divisors):
        if 1.0 + 1e-5 < d < factor * (1 - 1e-5):
            u = base ** (-2 * i / head_dim) / (2 * math.pi)       # 1 / wavelength
            points.append((u, (1 / d - 1 / factor) / (1 - 1 / factor)))
    if len(points) < 2:
        raise bad
    n = len(points)
    mu, ms = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    slope = sum((u - mu) * (v - ms) for u, v in points) / sum((u - mu) ** 2 for u, _ in points)
    intercept = ms - slope * mu                     # s = slope * u + intercept, slope = old / (high - low)
    if slope <= 0 or intercept >= 0:
        raise bad
    old = round(-slope / intercept)                 # with low = 1: low = -intercept * old / slope
    high = round(1 + old / slope, 4)
    again = llama3_factors(base, head_dim, factor, 1.0, high, old)
    if any(abs(a - b) > 1e-3 * b for a, b in zip(again, divisors, strict=True)):
        raise bad
    return float(factor), (("high_freq_factor", high), ("low_freq_factor", 1.0),
                           ("original_max_position_embeddings", old))
