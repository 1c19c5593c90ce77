"""Model configuration: one frozen dataclass, parsed from Hugging Face `config.json` or GGUF metadata.

Runtime choices (device, dtype, cache sizes) live in :class:`chatcore.runtime.Runtime`, never here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatcore.errors import ModelFormatError, UnsupportedArchitecture

# Hugging Face `architectures` / `model_type` names -> our family name.
_HF_FAMILIES = {
    "LlamaForCausalLM": "llama",
    "llama": "llama",
}
# GGUF `general.architecture` -> our family name.
_GGUF_FAMILIES = {"llama": "llama"}

SUPPORTED = "Llama family (Llama 2, Llama 3/3.1/3.2, SmolLM/SmolLM2)"


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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ModelFormatError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"model config: num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ModelFormatError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in ("silu", "swish"):
            raise ModelFormatError(f"model config: activation {self.hidden_act!r} is not supported (silu only)")

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Parse a transformers ``config.json`` dict (``rope_scaling`` or nested ``rope_parameters``)."""
        family = _hf_family(raw)
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            rope_theta, scaling = _hf_rope(raw)
            eos = raw.get("eos_token_id")
            return cls(
                family=family,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                hidden_act=str(raw.get("hidden_act", "silu")),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=_as_ids(eos),
            )
        except KeyError as exc:
            raise ModelFormatError(f"config.json lacks the field {exc.args[0]!r}; is it a causal LM config?") from None
        except (TypeError, ValueError) as exc:
            raise ModelFormatError(f"config.json has a malformed value: {exc}") from None

    @classmethod
    def from_hf_file(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelFormatError(f"{path.parent} has no config.json; a model directory needs one") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFormatError(f"{path} is not valid JSON ({exc}); re-download the model") from None
        if not isinstance(raw, dict):
            raise ModelFormatError(f"{path} does not hold a JSON object; re-download the model")
        return cls.from_hf(raw)

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any]) -> ModelConfig:
        """Parse GGUF metadata (plain key/value dict)."""
        arch = meta.get("general.architecture")
        family = _GGUF_FAMILIES.get(str(arch))
        if family is None:
            raise UnsupportedArchitecture(
                f"GGUF architecture {arch!r} is not supported; supported: {SUPPORTED}")
        p = f"{arch}."
        try:
            hidden = int(meta[p + "embedding_length"])
            heads = int(meta[p + "attention.head_count"])
            vocab = meta.get(p + "vocab_size") or len(meta["tokenizer.ggml.tokens"])
            factor = meta.get(p + "rope.scaling.factor")
            kind = meta.get(p + "rope.scaling.type", "none")
            scaling = RopeScaling()
            if kind == "linear" and factor:
                scaling = RopeScaling("linear", float(factor))
            elif kind not in ("none", None) and factor:
                raise ModelFormatError(f"GGUF RoPE scaling {kind!r} is not supported yet")
            eos = meta.get("tokenizer.ggml.eos_token_id")
            return cls(
                family=family,
                vocab_size=int(vocab),
                hidden_size=hidden,
                intermediate_size=int(meta[p + "feed_forward_length"]),
                num_layers=int(meta[p + "block_count"]),
                num_heads=heads,
                num_kv_heads=int(meta.get(p + "attention.head_count_kv") or heads),
                head_dim=int(meta.get(p + "rope.dimension_count") or hidden // heads),
                max_position_embeddings=int(meta.get(p + "context_length", 2048)),
                rms_norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
                rope_scaling=scaling,
                tie_word_embeddings=False,  # decided by the loader from the tensors present
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_ids=_as_ids(eos),
            )
        except KeyError as exc:
            raise ModelFormatError(f"GGUF metadata lacks {exc.args[0]!r}; the file is incomplete") from None

    def to_hf(self) -> dict[str, Any]:
        """A transformers-compatible ``config.json`` dict (used when converting GGUF to safetensors)."""
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "torch_dtype": "float32",
        }
        if self.rope_scaling.kind != "default":
            out["rope_scaling"] = {"rope_type": self.rope_scaling.kind, "factor": self.rope_scaling.factor,
                                   **dict(self.rope_scaling.params)}
        return out


def _hf_family(raw: Mapping[str, Any]) -> str:
    names = list(raw.get("architectures") or []) + [raw.get("model_type")]
    for name in names:
        if name in _HF_FAMILIES:
            return _HF_FAMILIES[name]
    shown = ", ".join(str(n) for n in names if n) or "none given"
    raise UnsupportedArchitecture(f"architecture {shown} is not supported; supported: {SUPPORTED}")


def _hf_rope(raw: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    """Read RoPE settings from either ``rope_theta`` + ``rope_scaling`` or the nested ``rope_parameters``."""
    params = raw.get("rope_parameters")
    scaling = dict(params) if isinstance(params, Mapping) else dict(raw.get("rope_scaling") or {})
    theta = float(scaling.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = str(scaling.pop("rope_type", scaling.pop("type", "default")))
    factor = float(scaling.pop("factor", 1.0) or 1.0)
    rest = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items()))
    return theta, RopeScaling(kind, factor, rest)


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)
