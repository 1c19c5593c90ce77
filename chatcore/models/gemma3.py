"""Gemma 3 (text): the Llama-style decoder with Gemma's changes, as transformers' ``Gemma3ForCausalLM`` runs them:
embeddings scaled by sqrt(hidden); RMSNorms that scale by (1 + weight), in float32; q/k RMSNorm per head;
"sandwich" norms (after attention and after the MLP too, before each residual add); a tanh-GELU gated MLP;
scores scaled by ``query_pre_attn_scalar`` ** -0.5; sliding-window layers with their own RoPE base
(``rope_local_theta``) between full-attention layers (RoPE scaling applies to the full layers only);
optional final logit soft-capping; tied output head.

The KV cache holds rotated keys; a span drop re-rotates each layer's keys with that layer's frequencies.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from chatcore.config import ModelConfig, RopeScaling
from chatcore.layers.linear import for_linear, linear
from chatcore.layers.rope import Rotary
from chatcore.models.base import CausalLM
from chatcore.models.llama import GetTensor
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
    __slots__ = ("attn_norm", "post_attn_norm", "wqkv", "bqkv", "wo", "bo", "q_norm", "k_norm", "window",
                 "mlp_norm", "post_mlp_norm", "w_gate_up", "w_down")

    def __init__(self, get: GetTensor, p: str, cfg: ModelConfig, layer: int) -> None:
        a, m = f"{p}.self_attn", f"{p}.mlp"
        self.attn_norm = gemma_norm_weight(get(f"{p}.input_layernorm.weight"))
        self.post_attn_norm = gemma_norm_weight(get(f"{p}.post_attention_layernorm.weight"))
        self.mlp_norm = gemma_norm_weight(get(f"{p}.pre_feedforward_layernorm.weight"))
        self.post_mlp_norm = gemma_norm_weight(get(f"{p}.post_feedforward_layernorm.weight"))
        self.q_norm = gemma_norm_weight(get(f"{a}.q_norm.weight"))
        self.k_norm = gemma_norm_weight(get(f"{a}.k_norm.weight"))
        self.wqkv = for_linear(torch.cat([get(f"{a}.{x}_proj.weight") for x in "qkv"]))
        self.wo = for_linear(get(f"{a}.o_proj.weight"))
        self.bqkv = torch.cat([get(f"{a}.{x}_proj.bias") for x in "qkv"]) if cfg.attention_bias else None
        self.bo = get(f"{a}.o_proj.bias") if cfg.attention_bias else None
        self.window = cfg.window(layer)
        self.w_gate_up = for_linear(torch.cat([get(f"{m}.gate_proj.weight"), get(f"{m}.up_proj.weight")]))
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
        self.rotary = LayerRotary([local if layer.window else full for layer in self.layers])
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # the attention entry point scales scores by 1/sqrt(head_dim); query_pre_attn_scalar goes into q
        scale = (cfg.softmax_scale or cfg.head_dim**-0.5) * math.sqrt(cfg.head_dim)
        self.q_scale = None if abs(scale - 1.0) < 1e-12 else scale

    @staticmethod
    def tensor_names(cfg: ModelConfig) -> list[str]:
        names = CausalLM.outer_names(cfg)
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}"
            names += [f"{p}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm",
                                                  "pre_feedforward_layernorm", "post_feedforward_layernorm")]
            names += [f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"]
            if cfg.attention_bias:
                names += [f"{p}.self_attn.{x}_proj.bias" for x in "qkvo"]
            names += [f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"]
            names += [f"{p}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        return names

    def run(self, ids: torch.Tensor, step: Step, *, all_logits: bool = False) -> torch.Tensor:
        c, eps = self.cfg, self.cfg.rms_norm_eps
        t = ids.shape[0]
        row_linear = self.row_linear
        x = self.embed_ids(ids, self.embed) * self.embed_scale
        for i, layer in enumerate(self.layers):
            h = gemma_rms_norm(x, layer.attn_norm, eps)
            q, k, v = linear(h, layer.wqkv, layer.bqkv).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            q = gemma_rms_norm(q.view(t, c.num_heads, c.head_dim), layer.q_norm, eps)
            k = gemma_rms_norm(k.view(t, c.num_kv_heads, c.head_dim), layer.k_norm, eps)
            if self.q_scale is not None:
                q = q * self.q_scale   # before the rotation: it is linear, so the scores are the same
            o = step.attend(i, q, k, v.view(t, c.num_kv_heads, c.head_dim), rotary=self.rotary.per_layer[i],
                            window=layer.window)
            o = row_linear(o.reshape(t, self.q_size), layer.wo, layer.bo)
            x = x + gemma_rms_norm(o, layer.post_attn_norm, eps)
            gate, up = linear(gemma_rms_norm(x, layer.mlp_norm, eps), layer.w_gate_up).chunk(2, dim=-1)
            h = row_linear(F.gelu(gate, approximate="tanh") * up, layer.w_down)
            x = x + gemma_rms_norm(h, layer.post_mlp_norm, eps)
        if not all_logits:
            x = x[-1:]
        logits = self.head(gemma_rms_norm(x, self.norm, eps), self.lm_head)
        if c.final_logit_softcap is not None:
            logits = torch.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
        return logits
