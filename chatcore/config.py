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
    "LlamaForCausalLM": "llama", "llama": "llama",
    "MistralForCausalLM": "mistral", "mistral": "mistral",
    "Qwen2ForCausalLM": "qwen2", "qwen2": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "qwen3": "qwen3",
    "BloomForCausalLM": "bloom", "bloom": "bloom",
    "MptForCausalLM": "mpt", "mpt": "mpt",
    "Gemma3ForCausalLM": "gemma3", "gemma3_text": "gemma3",
}
SUPPORTED = ("Llama (Llama 2, Llama 3/3.1/3.2, SmolLM/SmolLM2), Mistral, Qwen2, Qwen3, Gemma 3 text (RoPE); "
             "BLOOM, MPT (ALiBi)")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
_ACTIVATIONS = {"rope": ("silu", "swish"), "alibi": ("gelu", "bloom_gelu")}
_FAMILY_ACTIVATIONS = {"gemma3": ("gelu_pytorch_tanh",)}


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
    layer_windows: tuple[int, ...] = ()  # sliding window per layer, 0 = full attention; () = all full
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
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"model config: num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.position not in _ACTIVATIONS:
            raise ModelFormatError(f"model config: position encoding {self.position!r} is not rope or alibi")
        if self.position == "rope" and self.head_dim % 2:
            raise ModelFormatError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        activations = _FAMILY_ACTIVATIONS.get(self.family, _ACTIVATIONS[self.position])
        if self.hidden_act not in activations:
            raise ModelFormatError(f"model config: activation {self.hidden_act!r} is not supported for "
                                   f"{self.family} (supported: {', '.join(activations)})")
        if self.position == "rope" and self.rope_scaling.kind not in ROPE_TYPES:
            raise ModelFormatError(f"RoPE scaling type {self.rope_scaling.kind!r} is not supported "
                                   f"(supported: {', '.join(ROPE_TYPES)})")
        if self.layer_windows and (len(self.layer_windows) != self.num_layers or min(self.layer_windows) < 0):
            raise ModelFormatError(f"model config: {len(self.layer_windows)} per-layer windows for "
                                   f"{self.num_layers} layers")

    def window(self, layer: int) -> int | None:
        """The sliding-window size of ``layer`` (None: full causal attention)."""
        w = self.layer_windows[layer] if self.layer_windows else 0
        return w or None

    @property
    def max_window(self) -> int:
        """The longest context this model may serve: its positions, or factor x that for dynamic NTK RoPE,
        whose table is then computed (and frozen) for the serving window."""
        if self.position == "rope" and self.rope_scaling.kind == "dynamic":
            return int(self.max_position_embeddings * max(self.rope_scaling.factor, 1.0))
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Parse a transformers ``config.json`` dict (``rope_scaling`` or nested ``rope_parameters``)."""
        family = _hf_family(raw)
        try:
            if family in ("bloom", "mpt"):
                return cls(**_alibi_fields(family, raw))
            if family == "gemma3":
                return cls(**_gemma3_fields(raw))
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
                qkv_bias=family == "qwen2",
                qk_norm=family == "qwen3",
                layer_windows=_hf_windows(family, raw),
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
        """Parse GGUF metadata (plain key/value dict) of any supported ``general.architecture``."""
        from chatcore.config_gguf import gguf_fields

        fields = gguf_fields(meta, SUPPORTED)
        kind, factor, params = fields.pop("rope_scaling", ("default", 1.0, ()))
        return cls(**fields, rope_scaling=RopeScaling(kind, factor, params))

    def to_hf(self) -> dict[str, Any]:
        """A transformers-compatible ``config.json`` dict (used when converting GGUF to safetensors)."""
        eos = list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0]
        common = {"vocab_size": self.vocab_size, "tie_word_embeddings": self.tie_word_embeddings,
                  "bos_token_id": self.bos_token_id, "eos_token_id": eos, "torch_dtype": "float32"}
        if self.family == "bloom":
            return {"architectures": ["BloomForCausalLM"], "model_type": "bloom", **common,
                    "hidden_size": self.hidden_size, "n_layer": self.num_layers, "n_head": self.num_heads,
                    "layer_norm_epsilon": self.rms_norm_eps, "seq_length": self.max_position_embeddings,
                    "apply_residual_connection_post_layernorm": self.residual_post_norm}
        if self.family == "mpt":
            bias_max = self.alibi_bias_max
            attn = {"alibi": True, "alibi_bias_max": int(bias_max) if bias_max.is_integer() else bias_max,
                    "clip_qkv": self.clip_qkv, "softmax_scale": self.softmax_scale}
            return {"architectures": ["MptForCausalLM"], "model_type": "mpt", **common, "d_model": self.hidden_size,
                    "n_layers": self.num_layers, "n_heads": self.num_heads, "max_seq_len": self.max_position_embeddings,
                    "expansion_ratio": self.intermediate_size // self.hidden_size, "no_bias": True,
                    "layer_norm_epsilon": self.rms_norm_eps, "attn_config": attn}
        if self.family == "gemma3":
            return self._gemma3_hf(common)
        arch = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[self.family]
        out: dict[str, Any] = {
            "architectures": [f"{arch}ForCausalLM"],
            "model_type": self.family,
            **common,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": self.hidden_act,
        }
        if self.rope_scaling.kind != "default":
            out["rope_scaling"] = {"rope_type": self.rope_scaling.kind, "factor": self.rope_scaling.factor,
                                   **dict(self.rope_scaling.params)}
        if self.family == "mistral":
            out["sliding_window"] = self.layer_windows[0] if self.layer_windows else None
        elif self.layer_windows:  # Qwen2 / Qwen3: windows on the layers layer_types names
            out.update(use_sliding_window=True, sliding_window=max(self.layer_windows),
                       layer_types=["sliding_attention" if w else "full_attention" for w in self.layer_windows])
        return out


    def _gemma3_hf(self, common: dict[str, Any]) -> dict[str, Any]:
        full: dict[str, Any] = {"rope_type": self.rope_scaling.kind, "rope_theta": self.rope_theta}
        if self.rope_scaling.kind != "default":
            full.update(factor=self.rope_scaling.factor, **dict(self.rope_scaling.params))
        local = {"rope_type": "default", "rope_theta": self.rope_local_theta or self.rope_theta}
        windows = self.layer_windows or (0,) * self.num_layers
        return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **common,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
                "hidden_activation": self.hidden_act, "attention_bias": self.attention_bias,
                "query_pre_attn_scalar": round((self.softmax_scale or self.head_dim**-0.5) ** -2),
                "sliding_window": max(windows) or None,
                "layer_types": ["sliding_attention" if w else "full_attention" for w in windows],
                "rope_parameters": {"full_attention": full, "sliding_attention": local},
                "final_logit_softcapping": self.final_logit_softcap}


def _hf_family(raw: Mapping[str, Any]) -> str:
    names = list(raw.get("architectures") or []) + [raw.get("model_type")]
    for name in names:
        if name in _HF_FAMILIES:
            return _HF_FAMILIES[name]
    shown = ", ".join(str(n) for n in names if n) or "none given"
    raise UnsupportedArchitecture(f"architecture {shown} is not supported; supported: {SUPPORTED}")


def _hf_rope(raw: Mapping[str, Any]) -> tuple[float, RopeScaling]:
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


def _hf_windows(family: str, raw: Mapping[str, Any]) -> tuple[int, ...]:
    """Per-layer sliding windows: every layer for Mistral; for Qwen2/3 ``layer_types`` (or, in older configs,
    ``use_sliding_window`` from layer ``max_window_layers`` on), as their transformers configs decide."""
    layers = int(raw["num_hidden_layers"])
    window = raw.get("sliding_window")
    if family == "mistral":
        return (int(window),) * layers if window else ()
    if family not in ("qwen2", "qwen3") or not window or not raw.get("use_sliding_window", False):
        return ()
    types = raw.get("layer_types")
    if not types:
        start = int(raw.get("max_window_layers", layers))
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(layers)]
    out = tuple(int(window) if t == "sliding_attention" else 0 for t in types)
    return out if any(out) else ()


def _gemma3_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 3 (text) as ModelConfig fields: RoPE per layer type (``rope_parameters`` keyed by
    ``full_attention`` / ``sliding_attention``, or the older ``rope_theta`` + ``rope_local_base_freq`` +
    ``rope_scaling``), windows on the sliding layers (``layer_types``, else every layer but each
    ``sliding_window_pattern``-th), ``query_pre_attn_scalar`` as the softmax scale."""
    if raw.get("attn_logit_softcapping") is not None or raw.get("use_bidirectional_attention"):
        raise UnsupportedArchitecture("Gemma 3 with attention logit soft-capping or bidirectional attention is not "
                                      "supported; supported: " + SUPPORTED)
    layers = int(raw["num_hidden_layers"])
    params = raw.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params:
        full, local = dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
    else:
        full = {"rope_theta": raw.get("rope_theta", 1_000_000.0), **dict(raw.get("rope_scaling") or {})}
        local = {"rope_theta": raw.get("rope_local_base_freq", 10_000.0)}
    if str(local.get("rope_type", local.get("type", "default"))) != "default":
        raise ModelFormatError("Gemma 3 with scaled RoPE on its sliding layers is not supported")
    theta, scaling = _hf_rope({**raw, "rope_parameters": {"rope_theta": 1_000_000.0, **full}})
    types = raw.get("layer_types") or ["full_attention" if (i + 1) % int(raw.get("sliding_window_pattern", 6)) == 0
                                       else "sliding_attention" for i in range(layers)]
    window = int(raw.get("sliding_window") or 0)
    windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    heads = int(raw["num_attention_heads"])
    cap = raw.get("final_logit_softcapping")
    eos = raw.get("eos_token_id", 1)
    return dict(family="gemma3", vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
                intermediate_size=int(raw["intermediate_size"]), num_layers=layers, num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=int(raw.get("head_dim") or 256),
                max_position_embeddings=int(raw.get("max_position_embeddings", 131_072)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                rope_local_theta=float(local.get("rope_theta", 10_000.0)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
                attention_bias=bool(raw.get("attention_bias", False)),
                hidden_act=str(raw.get("hidden_activation") or "gelu_pytorch_tanh"), qk_norm=True,
                softmax_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5,
                layer_windows=windows if window and any(windows) else (),
                final_logit_softcap=None if cap is None else float(cap),
                bos_token_id=raw.get("bos_token_id", 2), eos_token_ids=_as_ids(eos))


def _alibi_fields(family: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """BLOOM and MPT configs (their own field names) as ModelConfig fields."""
    eos = _as_ids(raw.get("eos_token_id"))
    if family == "bloom":
        hidden = int(raw.get("hidden_size") or raw["n_embed"])
        heads = int(raw.get("n_head") or raw["num_attention_heads"])
        return dict(family=family, vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
                    intermediate_size=4 * hidden, num_layers=int(raw.get("n_layer") or raw["num_hidden_layers"]),
                    num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                    max_position_embeddings=int(raw.get("seq_length") or 2048),  # ALiBi has no table; BLOOM's length
                    rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)), position="alibi",
                    hidden_act="bloom_gelu", tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
                    residual_post_norm=bool(raw.get("apply_residual_connection_post_layernorm", False)),
                    bos_token_id=raw.get("bos_token_id"), eos_token_ids=eos)
    attn = dict(raw.get("attn_config") or {})
    if not attn.get("alibi", True):
        raise UnsupportedArchitecture("MPT without ALiBi (learned positions) is not supported; supported: " + SUPPORTED)
    multi_query = attn.get("attn_type", "multihead_attention") != "multihead_attention"
    if attn.get("qk_ln") or attn.get("prefix_lm") or multi_query:
        raise UnsupportedArchitecture("MPT with qk_ln, prefix_lm or multi-query attention is not supported "
                                      "(transformers' MptForCausalLM does not run them either)")
    hidden, heads = int(raw["d_model"]), int(raw["n_heads"])
    return dict(family=family, vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
                intermediate_size=4 * hidden, num_layers=int(raw["n_layers"]), num_heads=heads,
                num_kv_heads=heads, head_dim=hidden // heads, max_position_embeddings=int(raw.get("max_seq_len", 2048)),
                rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)), position="alibi", hidden_act="gelu",
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
                alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
                softmax_scale=None if attn.get("softmax_scale") is None else float(attn["softmax_scale"]),
                clip_qkv=None if attn.get("clip_qkv") is None else float(attn["clip_qkv"]),
                bos_token_id=raw.get("bos_token_id"), eos_token_ids=eos)


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)
