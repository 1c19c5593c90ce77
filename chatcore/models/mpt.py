"""MPT: ALiBi (MPT's slope rule, ``alibi_bias_max``), bias-free LayerNorms and linears, a fused Wqkv
(q | k | v) optionally clamped (``clip_qkv``), an optional ``softmax_scale``, an exact-GELU MLP of
4 x hidden, tied output head (as transformers' ``MptForCausalLM`` runs it). One difference: we honour
``attn_config.alibi_bias_max`` as MosaicML's own code does; transformers always uses 8 (every released
MPT checkpoint has 8, so they agree on real models).

The KV cache holds keys as computed (no rotation), so dropping a span only moves them.

GGUF ``mpt`` files keep MPT's own fused q | k | v; their ``softmax_scale`` is not recorded (every released
checkpoint has the default), and files with ``max_alibi_bias`` 0 (no ALiBi) are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from chatcore.config import ModelConfig, as_ids
from chatcore.config_gguf import GGUFKeys, alibi_fields
from chatcore.errors import UnsupportedArchitecture
from chatcore.layers.alibi import mpt_slopes
from chatcore.layers.linear import for_linear, linear
from chatcore.layers.norm import layer_norm
from chatcore.models.base import CausalLM
from chatcore.models.family import Family, Fields, GetTensor, RefusedVariant
from chatcore.runtime import Runtime
from chatcore.step import Step
from chatcore.weights.gguf_names import GGUFNames


class Block:
    __slots__ = ("norm_1", "wqkv", "wo", "norm_2", "w_up", "w_down")

    def __init__(self, get: GetTensor, p: str) -> None:
        self.norm_1, self.norm_2 = get(f"{p}.norm_1.weight"), get(f"{p}.norm_2.weight")
        self.wqkv, self.wo = for_linear(get(f"{p}.attn.Wqkv.weight")), for_linear(get(f"{p}.attn.out_proj.weight"))
        self.w_up = for_linear(get(f"{p}.ffn.up_proj.weight"))
        self.w_down = for_linear(get(f"{p}.ffn.down_proj.weight"))


class MptModel(CausalLM):
    """A loaded MPT model; :meth:`run` takes T new tokens of one sequence through a cache step."""

    def __init__(self, cfg: ModelConfig, runtime: Runtime, get: GetTensor, backend: str) -> None:
        self.cfg, self.runtime, self.backend = cfg, runtime, backend
        self.embed = get("transformer.wte.weight")
        self.layers = [Block(get, f"transformer.blocks.{i}") for i in range(cfg.num_layers)]
        self.norm_f = get("transformer.norm_f.weight")
        self.lm_head = for_linear(self.embed if cfg.tie_word_embeddings else get("lm_head.weight"))
        self.slopes = _slopes(cfg).to(runtime.device)
        # the attention entry point scales scores by 1/sqrt(head_dim); a different softmax_scale goes into q
        self.q_scale = None if cfg.softmax_scale is None else cfg.softmax_scale * math.sqrt(cfg.head_dim)
        self.rotary = None

    def run(self, ids: torch.Tensor, step: Step, *, all_logits: bool = False) -> torch.Tensor:
        c, eps = self.cfg, self.cfg.rms_norm_eps
        t = ids.shape[0]
        row_linear = self.row_linear
        x = self.embed_ids(ids, self.embed, self.runtime.dtype)
        for i, layer in enumerate(self.layers):
            qkv = linear(layer_norm(x, layer.norm_1, None, eps), layer.wqkv)
            if c.clip_qkv is not None:
                qkv = qkv.clamp(min=-c.clip_qkv, max=c.clip_qkv)
            q, k, v = qkv.view(t, 3, c.num_heads, c.head_dim).unbind(1)
            if self.q_scale is not None:
                q = q * self.q_scale
            o = step.attend(i, q, k, v, rotary=None, alibi=self.slopes)
            x = row_linear(o.reshape(t, -1), layer.wo, residual=x)
            h = layer_norm(x, layer.norm_2, None, eps)
            x = row_linear(F.gelu(linear(h, layer.w_up)), layer.w_down, residual=x)
        x = step.select(x, all_logits)
        return self.head(layer_norm(x, self.norm_f, None, eps), self.lm_head)


def _slopes(cfg: ModelConfig) -> torch.Tensor:
    return mpt_slopes(cfg.num_heads, cfg.alibi_bias_max)


def _from_hf(raw: Mapping[str, Any]) -> Fields:
    eos = as_ids(raw.get("eos_token_id"))
    attn = dict(raw.get("attn_config") or {})
    if not attn.get("alibi", True):
        raise RefusedVariant("MPT without ALiBi (learned positions) is not supported")
    multi_query = attn.get("attn_type", "multihead_attention") != "multihead_attention"
    if attn.get("qk_ln") or attn.get("prefix_lm") or multi_query:
        raise UnsupportedArchitecture("MPT with qk_ln, prefix_lm or multi-query attention is not supported "
                                      "(transformers' MptForCausalLM does not run them either)")
    hidden, heads = int(raw["d_model"]), int(raw["n_heads"])
    return dict(vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
                intermediate_size=4 * hidden, num_layers=int(raw["n_layers"]), num_heads=heads,
                num_kv_heads=heads, head_dim=hidden // heads, max_position_embeddings=int(raw.get("max_seq_len", 2048)),
                rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)), hidden_act="gelu",
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
                alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
                softmax_scale=None if attn.get("softmax_scale") is None else float(attn["softmax_scale"]),
                clip_qkv=None if attn.get("clip_qkv") is None else float(attn["clip_qkv"]),
                bos_token_id=raw.get("bos_token_id"), eos_token_ids=eos)


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    bias_max = cfg.alibi_bias_max
    attn = {"alibi": True, "alibi_bias_max": int(bias_max) if bias_max.is_integer() else bias_max,
            "clip_qkv": cfg.clip_qkv, "softmax_scale": cfg.softmax_scale}
    return {"d_model": cfg.hidden_size, "n_layers": cfg.num_layers, "n_heads": cfg.num_heads,
            "max_seq_len": cfg.max_position_embeddings, "expansion_ratio": cfg.intermediate_size // cfg.hidden_size,
            "no_bias": True, "layer_norm_epsilon": cfg.rms_norm_eps, "attn_config": attn}


def _from_gguf(key: GGUFKeys, common: Mapping[str, Any]) -> Fields:
    out = alibi_fields(key, common, "mpt")
    bias_max = float(key("attention.max_alibi_bias", 8.0))
    if bias_max <= 0:
        raise UnsupportedArchitecture("MPT GGUF without ALiBi (max_alibi_bias 0) is not supported")
    clamp = key("attention.clamp_kqv", None)
    return {**out, "hidden_act": "gelu", "alibi_bias_max": bias_max,
            "clip_qkv": None if clamp is None else float(clamp)}


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, mlp, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (v, h), "transformer.norm_f.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg.num_layers):
        p = f"transformer.blocks.{i}"
        shapes |= {f"{p}.norm_1.weight": (h,), f"{p}.attn.Wqkv.weight": (3 * h, h),
                   f"{p}.attn.out_proj.weight": (h, h), f"{p}.norm_2.weight": (h,),
                   f"{p}.ffn.up_proj.weight": (mlp, h), f"{p}.ffn.down_proj.weight": (h, mlp)}
    return shapes


FAMILY = Family(
    name="mpt", label="MPT", position="alibi", model=MptModel, hf_architecture="MptForCausalLM", hf_model_type="mpt",
    config_from_hf=_from_hf, config_to_hf=_to_hf, activations=("gelu",), shapes=_shapes,
    split_rules=(("wte.weight", "vocab"), ("lm_head.weight", "vocab"), ("attn.Wqkv.weight", "qkv"),
                 ("attn.out_proj.weight", "out"), ("ffn.up_proj.weight", "up"), ("ffn.down_proj.weight", "down")),
    gguf_arch="mpt", config_from_gguf=_from_gguf,
    gguf_names=GGUFNames(
        "transformer.blocks",
        {"token_embd": "transformer.wte", "output_norm": "transformer.norm_f", "output": "lm_head"},
        {"attn_norm": "norm_1", "attn_qkv": "attn.Wqkv", "attn_output": "attn.out_proj", "ffn_norm": "norm_2",
         "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj"}),
    alibi_slopes=_slopes)
