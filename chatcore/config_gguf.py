"""GGUF metadata -> :class:`chatcore.config.ModelConfig` fields, per ``general.architecture``, reading the keys
llama.cpp's converter (``convert_hf_to_gguf.py``) writes for each family.

What GGUF does not record is decided by the loader from the tensors present (tied output head, biases).
Facts worth knowing:
- Mistral 7B is written with architecture ``llama`` and no sliding window (llama.cpp runs it with full
  attention); such a file loads as the Llama family, exactly as llama.cpp runs it.
- Gemma 3: llama.cpp fixes what its converter does not write: every 6th layer is a full-attention layer (unless
  ``attention.sliding_window_pattern`` says otherwise), the sliding layers' RoPE base is 10,000 (unless
  ``rope.freq_base_swa``), and scores are scaled by 1/sqrt(head_dim), or 1/sqrt(hidden / heads) for the
  62-layer 27B model (its ``query_pre_attn_scalar``).
- Llama 3.1 / 3.2 carry their RoPE scaling as a ``rope_freqs`` tensor (a divisor per frequency) computed by
  Llama 3's rule; :func:`llama3_scaling` recovers that rule's parameters (taking ``low_freq_factor`` = 1, as
  every Llama 3 has) and checks that they give the file's divisors back.
- BLOOM's ``apply_residual_connection_post_layernorm`` and MPT's ``softmax_scale`` are not recorded (every
  released checkpoint has the defaults); MPT files with ``max_alibi_bias`` 0 (no ALiBi) are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from chatcore.errors import ModelFormatError, UnsupportedArchitecture

# GGUF `general.architecture` -> our family name.
GGUF_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3", "bloom": "bloom",
                 "mpt": "mpt"}
# GGUF `rope.scaling.type` -> transformers' rope_type (llama.cpp writes Llama 3.1's scaling as a rope_freqs tensor).
_ROPE_TYPES = {"none": "default", "linear": "linear", "yarn": "yarn"}


def gguf_fields(meta: Mapping[str, Any], supported: str) -> dict[str, Any]:
    """Keyword arguments for ``ModelConfig`` (the RoPE scaling as ``(kind, factor, params)``)."""
    arch = str(meta.get("general.architecture"))
    family = GGUF_FAMILIES.get(arch)
    if family is None:
        raise UnsupportedArchitecture(f"GGUF architecture {arch!r} is not supported; supported GGUF architectures: "
                                      f"{', '.join(GGUF_FAMILIES)} ({supported})")
    key = _Keys(meta, arch)
    try:
        hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
        common: dict[str, Any] = dict(
            family=family, vocab_size=int(key("vocab_size", None) or len(meta["tokenizer.ggml.tokens"])),
            hidden_size=hidden, num_layers=int(key("block_count")), num_heads=heads,
            max_position_embeddings=int(key("context_length", 2048)),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_ids(meta.get("tokenizer.ggml.eos_token_id")))
        if family in ("bloom", "mpt"):
            return {**common, **_alibi(family, key, hidden, heads)}
        return {**common, **_rope(family, key, hidden, heads)}
    except KeyError as exc:
        raise ModelFormatError(f"GGUF metadata lacks {exc.args[0]!r}; the file is incomplete") from None
    except (TypeError, ValueError) as exc:
        raise ModelFormatError(f"GGUF metadata has a malformed value: {exc}") from None


class _Keys:
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


def _rope(family: str, key: _Keys, hidden: int, heads: int) -> dict[str, Any]:
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
    out = dict(intermediate_size=int(key("feed_forward_length")),
               num_kv_heads=int(key("attention.head_count_kv", heads)), head_dim=int(head_dim),
               rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
               rope_theta=float(key("rope.freq_base", 10000.0)),
               rope_scaling=(rope_type, float(factor or 1.0) if rope_type != "default" else 1.0, params),
               qkv_bias=family == "qwen2", qk_norm=family in ("qwen3", "gemma3"))
    if family == "gemma3":
        out.update(_gemma3(key, hidden, heads, int(head_dim)))
    return out


def _gemma3(key: _Keys, hidden: int, heads: int, head_dim: int) -> dict[str, Any]:
    if key("attn_logit_softcapping", None) is not None:
        raise UnsupportedArchitecture("Gemma GGUF with attention logit soft-capping is not supported")
    layers = int(key("block_count"))
    pattern = key("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):   # one flag per layer: True = sliding
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [(i + 1) % int(pattern) != 0 for i in range(layers)]
    window = int(key("attention.sliding_window", 0))
    scalar = hidden / heads if layers == 62 else head_dim
    cap = key("final_logit_softcapping", None)
    return dict(hidden_act="gelu_pytorch_tanh", rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
                layer_windows=tuple(window if s else 0 for s in sliding) if window and any(sliding) else (),
                rope_local_theta=float(key("rope.freq_base_swa", 10_000.0)), softmax_scale=float(scalar) ** -0.5,
                final_logit_softcap=None if cap is None else float(cap))


def _alibi(family: str, key: _Keys, hidden: int, heads: int) -> dict[str, Any]:
    kv_heads = int(key("attention.head_count_kv", heads))
    if kv_heads != heads:
        raise UnsupportedArchitecture(f"{family} GGUF with {kv_heads} KV heads for {heads} heads (multi-query "
                                      "attention) is not supported")
    out: dict[str, Any] = dict(intermediate_size=int(key("feed_forward_length", 4 * hidden)), num_kv_heads=heads,
                               head_dim=hidden // heads, rms_norm_eps=float(key("attention.layer_norm_epsilon", 1e-5)),
                               position="alibi", hidden_act="bloom_gelu" if family == "bloom" else "gelu")
    if family == "mpt":
        bias_max = float(key("attention.max_alibi_bias", 8.0))
        if bias_max <= 0:
            raise UnsupportedArchitecture("MPT GGUF without ALiBi (max_alibi_bias 0) is not supported")
        clamp = key("attention.clamp_kqv", None)
        out.update(alibi_bias_max=bias_max, clip_qkv=None if clamp is None else float(clamp))
    return out


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


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)
