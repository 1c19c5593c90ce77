"""Gemma 3 (text): the Llama-style decoder with Gemma's changes, as transformers' ``Gemma3ForCausalLM`` runs them:
embeddings scaled by sqrt(hidden); RMSNorms that scale by (1 + weight), in float32; q/k RMSNorm per head;
"sandwich" norms (after attention and after the MLP too, before each residual add); a tanh-GELU gated MLP;
scores scaled by ``query_pre_attn_scalar`` ** -0.5; sliding-window layers with their own RoPE base
(``rope_local_theta``) between full-attention layers (RoPE scaling applies to the full layers only);
optional final logit soft-capping; tied output head.

The KV cache holds rotated keys; a span drop re-rotates each layer's keys with that layer's frequencies.

GGUF: llama.cpp fixes what its converter does not write: every 6th layer is a full-attention layer (unless
``attention.sliding_window_pattern`` says otherwise), the sliding layers' RoPE base is 10,000 (unless
``rope.freq_base_swa``), and scores are scaled by 1/sqrt(head_dim), or 1/sqrt(hidden / heads) for the
62-layer 27B model (its ``query_pre_attn_scalar``). RMSNorm weights are stored as 1 + w (llama.cpp
multiplies by the weight; Gemma by 1 + w), so 1 is taken off again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from chatcore.config import ModelConfig, RopeScaling, as_ids, hf_rope
from chatcore.config_gguf import GGUFKeys, rope_fields
from chatcore.errors import ModelFormatError, UnsupportedArchitecture
from chatcore.layers.linear import for_linear, linear
from chatcore.layers.rope import Rotary
from chatcore.models import llama
from chatcore.models.base import CausalLM
from chatcore.models.family import Family, Fields, GetTensor, RefusedVariant
from chatcore.quant.weight import fuse_rows
from chatcore.runtime import Runtime
from chatcore.step import Step


def gemma_norm_weight(w: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm weight w as the float32 multiplier (1 + w) it applies."""
    return 1.0 + w.to(torch.float32)


def gemma_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32 times ``scale`` (= 1 + weight, float32), cast back to x's dtype."""
    return F.rms_norm(x.to(torch.float32), scale.shape, scale, eps).to(x.dtype)


class LayerRotary:
    """Each layer's own rotary table (Gemma 3: local and global RoPE bases); ``shift`` re-rotates keys laid out
    [layers, heads, positions, head_dim] (the KV cache's layout) with each layer's frequencies."""

    def __init__(self, per_layer: list[Rotary]) -> None:
        self.per_layer = per_layer
        self.inv_freq = torch.stack([r.inv_freq for r in per_layer])  # [layers, head_dim / 2]

    def shift(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        angle = (self.inv_freq * float(delta))[:, None, None, :]
        return Rotary.apply(keys, angle.cos().to(keys.dtype), angle.sin().to(keys.dtype))


class Block:
    __slots__ = ("attn_norm", "post_attn_norm", "wqkv", "bqkv", "wo", "bo", "q_norm", "k_norm", "sliding_window",
                 "mlp_norm", "post_mlp_norm", "w_gate_up", "w_down")

    def __init__(self, get: GetTensor, p: str, cfg: ModelConfig, layer: int) -> None:
        a, m = f"{p}.self_attn", f"{p}.mlp"
        self.attn_norm = gemma_norm_weight(get(f"{p}.input_layernorm.weight"))
        self.post_attn_norm = gemma_norm_weight(get(f"{p}.post_attention_layernorm.weight"))
        self.mlp_norm = gemma_norm_weight(get(f"{p}.pre_feedforward_layernorm.weight"))
        self.post_mlp_norm = gemma_norm_weight(get(f"{p}.post_feedforward_layernorm.weight"))
        self.q_norm = gemma_norm_weight(get(f"{a}.q_norm.weight"))
        self.k_norm = gemma_norm_weight(get(f"{a}.k_norm.weight"))
        self.wqkv = for_linear(fuse_rows([get(f"{a}.{x}_proj.weight") for x in "qkv"]))
        self.wo = for_linear(get(f"{a}.o_proj.weight"))
        self.bqkv = torch.cat([get(f"{a}.{x}_proj.bias") for x in "qkv"]) if cfg.attention_bias else None
        self.bo = get(f"{a}.o_proj.bias") if cfg.attention_bias else None
        self.sliding_window = cfg.sliding_window(layer)
        self.w_gate_up = for_linear(fuse_rows([get(f"{m}.gate_proj.weight"), get(f"{m}.up_proj.weight")]))
        self.w_down = for_linear(get(f"{m}.down_proj.weight"))


class Gemma3Model(CausalLM):
    """A loaded Gemma 3 text model; :meth:`run` takes T new tokens of one sequence through a cache step."""

    def __init__(self, cfg: ModelConfig, runtime: Runtime, get: GetTensor, backend: str) -> None:
        self.cfg, self.runtime, self.backend = cfg, runtime, backend
        self.embed = get("model.embed_tokens.weight")
        # transformers multiplies by sqrt(hidden) cast to the weights' dtype
        self.embed_scale = torch.tensor(cfg.hidden_size**0.5, dtype=torch.float32).to(runtime.dtype)
        self.layers = [Block(get, f"model.layers.{i}", cfg, i) for i in range(cfg.num_layers)]
        self.norm = gemma_norm_weight(get("model.norm.weight"))
        self.lm_head = for_linear(self.embed if cfg.tie_word_embeddings else get("lm_head.weight"))
        full = Rotary(cfg, runtime.max_seq_len, runtime.device)
        local_cfg = dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta or cfg.rope_theta,
                                        rope_scaling=RopeScaling())
        local = Rotary(local_cfg, runtime.max_seq_len, runtime.device)
        self.rotary = LayerRotary([local if layer.sliding_window else full for layer in self.layers])
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # the attention entry point scales scores by 1/sqrt(head_dim); query_pre_attn_scalar goes into q
        scale = (cfg.softmax_scale or cfg.head_dim**-0.5) * math.sqrt(cfg.head_dim)
        self.q_scale = None if abs(scale - 1.0) < 1e-12 else scale

    def run(self, ids: torch.Tensor, step: Step, *, all_logits: bool = False) -> torch.Tensor:
        c, eps = self.cfg, self.cfg.rms_norm_eps
        t = ids.shape[0]
        row_linear = self.row_linear
        x = self.embed_ids(ids, self.embed, self.runtime.dtype) * self.embed_scale
        for i, layer in enumerate(self.layers):
            h = gemma_rms_norm(x, layer.attn_norm, eps)
            q, k, v = linear(h, layer.wqkv, layer.bqkv).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            q = gemma_rms_norm(q.view(t, c.num_heads, c.head_dim), layer.q_norm, eps)
            k = gemma_rms_norm(k.view(t, c.num_kv_heads, c.head_dim), layer.k_norm, eps)
            if self.q_scale is not None:
                q = q * self.q_scale   # before the rotation: it is linear, so the scores are the same
            o = step.attend(i, q, k, v.view(t, c.num_kv_heads, c.head_dim), rotary=self.rotary.per_layer[i],
                            sliding_window=layer.sliding_window)
            o = row_linear(o.reshape(t, self.q_size), layer.wo, layer.bo)
            x = x + gemma_rms_norm(o, layer.post_attn_norm, eps)
            gate, up = linear(gemma_rms_norm(x, layer.mlp_norm, eps), layer.w_gate_up).chunk(2, dim=-1)
            h = row_linear(F.gelu(gate, approximate="tanh") * up, layer.w_down)
            x = x + gemma_rms_norm(h, layer.post_mlp_norm, eps)
        x = step.select(x, all_logits)
        logits = self.head(gemma_rms_norm(x, self.norm, eps), self.lm_head)
        if c.final_logit_softcap is not None:
            logits = torch.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
        return logits


def _from_hf(raw: Mapping[str, Any]) -> Fields:
    """RoPE per layer type (``rope_parameters`` keyed by ``full_attention`` / ``sliding_attention``, or the older
    ``rope_theta`` + ``rope_local_base_freq`` + ``rope_scaling``), windows on the sliding layers (``layer_types``,
    else every layer but each ``sliding_window_pattern``-th), ``query_pre_attn_scalar`` as the softmax scale."""
    if raw.get("attn_logit_softcapping") is not None or raw.get("use_bidirectional_attention"):
        raise RefusedVariant("Gemma 3 with attention logit soft-capping or bidirectional attention is not supported")
    layers = int(raw["num_hidden_layers"])
    params = raw.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params:
        full, local = dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
    else:
        full = {"rope_theta": raw.get("rope_theta", 1_000_000.0), **dict(raw.get("rope_scaling") or {})}
        local = {"rope_theta": raw.get("rope_local_base_freq", 10_000.0)}
    if str(local.get("rope_type", local.get("type", "default"))) != "default":
        raise ModelFormatError("Gemma 3 with scaled RoPE on its sliding layers is not supported")
    theta, scaling = hf_rope({**raw, "rope_parameters": {"rope_theta": 1_000_000.0, **full}})
    types = raw.get("layer_types") or ["full_attention" if (i + 1) % int(raw.get("sliding_window_pattern", 6)) == 0
                                       else "sliding_attention" for i in range(layers)]
    window = int(raw.get("sliding_window") or 0)
    windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    heads = int(raw["num_attention_heads"])
    cap = raw.get("final_logit_softcapping")
    eos = raw.get("eos_token_id", 1)
    return dict(vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
                intermediate_size=int(raw["intermediate_size"]), num_layers=layers, num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=int(raw.get("head_dim") or 256),
                max_position_embeddings=int(raw.get("max_position_embeddings", 131_072)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                rope_local_theta=float(local.get("rope_theta", 10_000.0)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
                attention_bias=bool(raw.get("attention_bias", False)),
                hidden_act=str(raw.get("hidden_activation") or "gelu_pytorch_tanh"), qk_norm=True,
                softmax_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5,
                sliding_windows=windows if window and any(windows) else (),
                final_logit_softcap=None if cap is None else float(cap),
                bos_token_id=raw.get("bos_token_id", 2), eos_token_ids=as_ids(eos))


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    full: dict[str, Any] = {"rope_type": cfg.rope_scaling.kind, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling.kind != "default":
        full.update(factor=cfg.rope_scaling.factor, **dict(cfg.rope_scaling.params))
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    windows = cfg.sliding_windows or (0,) * cfg.num_layers
    return {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
            "hidden_activation": cfg.hidden_act, "attention_bias": cfg.attention_bias,
            "query_pre_attn_scalar": round((cfg.softmax_scale or cfg.head_dim**-0.5) ** -2),
            "sliding_window": max(windows) or None,
            "layer_types": ["sliding_attention" if w else "full_attention" for w in windows],
            "rope_parameters": {"full_attention": full, "sliding_attention": local},
            "final_logit_softcapping": cfg.final_logit_softcap}


def _from_gguf(key: GGUFKeys, common: Mapping[str, Any]) -> Fields:
    out = rope_fields(key, common)
    if key("attn_logit_softcapping", None) is not None:
        raise UnsupportedArchitecture("Gemma GGUF with attention logit soft-capping is not supported")
    hidden, heads, layers = common["hidden_size"], common["num_heads"], common["num_layers"]
    pattern = key("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):   # one flag per layer: True = sliding
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [(i + 1) % int(pattern) != 0 for i in range(layers)]
    window = int(key("attention.sliding_window", 0))
    scalar = hidden / heads if layers == 62 else out["head_dim"]
    cap = key("final_logit_softcapping", None)
    return {**out, "qk_norm": True, "hidden_act": "gelu_pytorch_tanh",
            "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            "sliding_windows": tuple(window if s else 0 for s in sliding) if window and any(sliding) else (),
            "rope_local_theta": float(key("rope.freq_base_swa", 10_000.0)), "softmax_scale": float(scalar) ** -0.5,
            "final_logit_softcap": None if cap is None else float(cap)}


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes, proj, h = llama.outer_shapes(cfg), llama.projection_shapes(cfg), cfg.hidden_size
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.{n}.weight": (h,) for n in ("input_layernorm", "post_attention_layernorm",
                                                      "pre_feedforward_layernorm", "post_feedforward_layernorm")}
        shapes |= {f"{p}.self_attn.{x}_proj.weight": proj[x] for x in "qkvo"}
        if cfg.attention_bias:
            shapes |= {f"{p}.self_attn.{x}_proj.bias": proj[x][:1] for x in "qkvo"}
        shapes |= {f"{p}.self_attn.q_norm.weight": (cfg.head_dim,), f"{p}.self_attn.k_norm.weight": (cfg.head_dim,)}
        shapes |= {f"{p}.mlp.{x}_proj.weight": proj[x] for x in ("gate", "up", "down")}
    return shapes


FAMILY = Family(
    name="gemma3", label="Gemma 3 text", position="rope", model=Gemma3Model, hf_architecture="Gemma3ForCausalLM",
    hf_model_type="gemma3_text", config_from_hf=_from_hf, config_to_hf=_to_hf, activations=("gelu_pytorch_tanh",),
    shapes=_shapes, split_rules=llama.SPLIT_RULES, gguf_arch="gemma3", config_from_gguf=_from_gguf,
    gguf_names=dataclasses.replace(llama.GGUF_NAMES, block={
        **llama.GGUF_NAMES.block, "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
        reorder={}, norms_plus_one=True),
    settings_from_tensors=llama.llama_style_settings)
