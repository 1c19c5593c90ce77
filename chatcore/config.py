"""Model configuration: one frozen dataclass, and the family-independent parts of reading it (RoPE settings).

Each family parses its own ``config.json`` fields and GGUF keys (its file in :mod:`chatcore.models`);
:mod:`chatcore.checkpoint_config` picks the family and builds the config. Runtime choices (device, dtype,
cache sizes) live in :class:`chatcore.runtime.Runtime`, never here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chatcore.errors import ModelFormatError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
POSITIONS = ("rope", "alibi")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling as transformers describes it; ``kind`` is ``rope_type`` ("default", "linear", "llama3", ...)."""

    kind: str = "default"
    factor: float = 1.0
    params: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    qkv_bias: bool = False            # biases on q/k/v only (Qwen2); attention_bias puts them on q/k/v/o
    qk_norm: bool = False             # RMSNorm of each q and k head before RoPE (Qwen3)
    sliding_windows: tuple[int, ...] = ()  # sliding window per layer, 0 = full attention; () = all full
    position: str = "rope"            # "rope" or "alibi" (BLOOM, MPT); rms_norm_eps is then LayerNorm's eps
    alibi_bias_max: float = 8.0       # MPT's slope rule
    softmax_scale: float | None = None  # None: 1/sqrt(head_dim)
    clip_qkv: float | None = None     # MPT: clamp the fused qkv projection
    residual_post_norm: bool = False  # BLOOM's apply_residual_connection_post_layernorm
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers (Gemma 3); None: rope_theta
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ModelFormatError(f"model config: {name} must be positive, got {getattr(self, name)}")
        for name in ("rope_theta", "rope_local_theta", "rms_norm_eps", "softmax_scale", "clip_qkv",
                     "final_logit_softcap", "alibi_bias_max"):
            value = getattr(self, name)
            floor_ok = value == 0 and name == "rms_norm_eps"
            if value is not None and not (math.isfinite(value) and (value > 0 or floor_ok)):
                raise ModelFormatError(f"model config: {name} must be a positive finite number, got {value}")
        scaling = (self.rope_scaling.factor, *(v for _, v in self.rope_scaling.params if isinstance(v, float)))
        if not all(math.isfinite(v) for v in scaling) or self.rope_scaling.factor <= 0:
            raise ModelFormatError(f"model config: RoPE scaling {self.rope_scaling.kind} has a factor or parameter "
                                   f"that is not a positive finite number ({self.rope_scaling.factor})")
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"model config: num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.position not in POSITIONS:
            raise ModelFormatError(f"model config: position encoding {self.position!r} is not rope or alibi")
        if self.position == "rope" and self.head_dim % 2:
            raise ModelFormatError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.position == "rope" and self.rope_scaling.kind not in ROPE_TYPES:
            raise ModelFormatError(f"RoPE scaling type {self.rope_scaling.kind!r} is not supported "
                                   f"(supported: {', '.join(ROPE_TYPES)})")
        if self.sliding_windows and (len(self.sliding_windows) != self.num_layers or min(self.sliding_windows) < 0):
            raise ModelFormatError(f"model config: {len(self.sliding_windows)} per-layer windows for "
                                   f"{self.num_layers} layers")

    def sliding_window(self, layer: int) -> int | None:
        """The sliding-window size of ``layer`` (None: full causal attention)."""
        w = self.sliding_windows[layer] if self.sliding_windows else 0
        return w or None

    @property
    def max_window(self) -> int:
        """The longest context this model may serve: its positions, or factor x that for dynamic NTK RoPE,
        whose table is then computed (and frozen) for the serving window."""
        if self.position == "rope" and self.rope_scaling.kind == "dynamic":
            return int(self.max_position_embeddings * max(self.rope_scaling.factor, 1.0))
        return self.max_position_embeddings


def hf_rope(raw: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    """Read RoPE settings from either ``rope_theta`` + ``rope_scaling`` or the nested ``rope_parameters``.

    As transformers does: llama3 / yarn / longrope take ``original_max_position_embeddings`` from the top
    level of the config when it is there (Phi-3), else from the scaling dict, else ``max_position_embeddings``;
    yarn / longrope without a ``factor`` use max_position_embeddings / original_max_position_embeddings.
    """
    params = raw.get("rope_parameters")
    scaling = dict(params) if isinstance(params, Mapping) else dict(raw.get("rope_scaling") or {})
    theta = float(scaling.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = str(scaling.pop("rope_type", scaling.pop("type", "default")))
    factor = scaling.pop("factor", None)
    if kind in ("llama3", "yarn", "longrope"):
        max_pos = int(raw.get("max_position_embeddings", 2048))
        original = raw.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = int(original or max_pos)
        if factor is None and kind in ("yarn", "longrope"):
            factor = max_pos / scaling["original_max_position_embeddings"]
    factor = float(factor or 1.0)
    rest = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items() if v is not None))
    return theta, RopeScaling(kind, factor, rest)


def as_ids(value: Any) -> tuple[int, ...]:
    """Token ids as a tuple: ``eos_token_id`` may be one id, a list of them, or missing."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)
