"""BLOOM: ALiBi instead of RoPE, LayerNorms with biases (one more right after the embeddings), a fused
query_key_value projection laid out per head ([heads, 3, head_dim] rows; regrouped to q | k | v at load),
a tanh-GELU MLP of 4 x hidden, biases everywhere, tied output head.

The KV cache holds keys as computed (no rotation), so dropping a span only moves them.

GGUF ``bloom`` files hold the fused ``attn_qkv`` as all q rows, then k, then v; :func:`qkv_to_per_head`
restores BLOOM's per-head layout. ``apply_residual_connection_post_layernorm`` is not recorded there (every
released checkpoint has the default, off).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from chatcore.config import ModelConfig, as_ids
from chatcore.config_gguf import GGUFKeys, alibi_fields
from chatcore.layers.alibi import bloom_slopes
from chatcore.layers.linear import for_linear, linear
from chatcore.layers.norm import layer_norm
from chatcore.models.base import CausalLM
from chatcore.models.family import Family, Fields, GetTensor
from chatcore.quant.weight import reorder_rows
from chatcore.runtime import Runtime
from chatcore.step import Step
from chatcore.weights.gguf_names import GGUFNames, Rows


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """BLOOM's tanh GELU, with its own constants (as ``transformers`` ``bloom_gelu_forward``)."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def _per_head_to_qkv(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows [heads, 3, head_dim] (BLOOM's fused layout) -> [3, heads, head_dim] (q rows, then k, then v)."""
    return w.reshape(heads, 3, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


class Block:
    __slots__ = ("ln1_w", "ln1_b", "wqkv", "bqkv", "wo", "bo", "ln2_w", "ln2_b", "w_up", "b_up", "w_down", "b_down")

    def __init__(self, get: GetTensor, p: str, cfg: ModelConfig) -> None:
        h = cfg.num_heads
        self.ln1_w, self.ln1_b = get(f"{p}.input_layernorm.weight"), get(f"{p}.input_layernorm.bias")
        self.wqkv = for_linear(reorder_rows(get(f"{p}.self_attention.query_key_value.weight"),
                                            lambda rows: _per_head_to_qkv(rows, h)))
        self.bqkv = _per_head_to_qkv(get(f"{p}.self_attention.query_key_value.bias"), h)
        self.wo, self.bo = for_linear(get(f"{p}.self_attention.dense.weight")), get(f"{p}.self_attention.dense.bias")
        self.ln2_w, self.ln2_b = get(f"{p}.post_attention_layernorm.weight"), get(f"{p}.post_attention_layernorm.bias")
        self.w_up, self.b_up = for_linear(get(f"{p}.mlp.dense_h_to_4h.weight")), get(f"{p}.mlp.dense_h_to_4h.bias")
        self.w_down, self.b_down = for_linear(get(f"{p}.mlp.dense_4h_to_h.weight")), get(f"{p}.mlp.dense_4h_to_h.bias")


class BloomModel(CausalLM):
    """A loaded BLOOM model; :meth:`run` takes T new tokens of one sequence through a cache step."""

    def __init__(self, cfg: ModelConfig, runtime: Runtime, get: GetTensor, backend: str) -> None:
        self.cfg, self.runtime, self.backend = cfg, runtime, backend
        self.embed = get("transformer.word_embeddings.weight")
        self.embed_ln_w = get("transformer.word_embeddings_layernorm.weight")
        self.embed_ln_b = get("transformer.word_embeddings_layernorm.bias")
        self.layers = [Block(get, f"transformer.h.{i}", cfg) for i in range(cfg.num_layers)]
        self.ln_f_w, self.ln_f_b = get("transformer.ln_f.weight"), get("transformer.ln_f.bias")
        self.lm_head = for_linear(self.embed if cfg.tie_word_embeddings else get("lm_head.weight"))
        self.slopes = _slopes(cfg).to(runtime.device)
        self.rotary = None

    def run(self, ids: torch.Tensor, step: Step, *, all_logits: bool = False) -> torch.Tensor:
        c, eps = self.cfg, self.cfg.rms_norm_eps
        t = ids.shape[0]
        row_linear = self.row_linear
        x = layer_norm(self.embed_ids(ids, self.embed, self.runtime.dtype), self.embed_ln_w, self.embed_ln_b, eps)
        for i, layer in enumerate(self.layers):
            h = layer_norm(x, layer.ln1_w, layer.ln1_b, eps)
            residual = h if c.residual_post_norm else x
            q, k, v = linear(h, layer.wqkv, layer.bqkv).view(t, 3, c.num_heads, c.head_dim).unbind(1)
            o = step.attend(i, q, k, v, rotary=None, alibi=self.slopes)
            x = row_linear(o.reshape(t, -1), layer.wo, layer.bo, residual=residual)
            h = layer_norm(x, layer.ln2_w, layer.ln2_b, eps)
            residual = h if c.residual_post_norm else x
            up = bloom_gelu(linear(h, layer.w_up, layer.b_up))
            x = row_linear(up, layer.w_down, layer.b_down, residual=residual)
        x = step.select(x, all_logits)
        return self.head(layer_norm(x, self.ln_f_w, self.ln_f_b, eps), self.lm_head)


def _slopes(cfg: ModelConfig) -> torch.Tensor:
    return bloom_slopes(cfg.num_heads)


def _from_hf(raw: Mapping[str, Any]) -> Fields:
    eos = as_ids(raw.get("eos_token_id"))
    hidden = int(raw.get("hidden_size") or raw["n_embed"])
    heads = int(raw.get("n_head") or raw["num_attention_heads"])
    return dict(vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
                intermediate_size=4 * hidden, num_layers=int(raw.get("n_layer") or raw["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                max_position_embeddings=int(raw.get("seq_length") or 2048),  # ALiBi has no table; BLOOM's length
                rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)), hidden_act="bloom_gelu",
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
                residual_post_norm=bool(raw.get("apply_residual_connection_post_layernorm", False)),
                bos_token_id=raw.get("bos_token_id"), eos_token_ids=eos)


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"hidden_size": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
            "layer_norm_epsilon": cfg.rms_norm_eps, "seq_length": cfg.max_position_embeddings,
            "apply_residual_connection_post_layernorm": cfg.residual_post_norm}


def _from_gguf(key: GGUFKeys, common: Mapping[str, Any]) -> Fields:
    return {**alibi_fields(key, common, "bloom"), "hidden_act": "bloom_gelu"}


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, mlp, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.word_embeddings.weight": (v, h)}
    for ln in ("transformer.word_embeddings_layernorm", "transformer.ln_f"):
        shapes |= {f"{ln}.weight": (h,), f"{ln}.bias": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg.num_layers):
        for mod, shape in (("input_layernorm", (h,)), ("self_attention.query_key_value", (3 * h, h)),
                           ("self_attention.dense", (h, h)), ("post_attention_layernorm", (h,)),
                           ("mlp.dense_h_to_4h", (mlp, h)), ("mlp.dense_4h_to_h", (h, mlp))):
            shapes |= {f"transformer.h.{i}.{mod}.weight": shape, f"transformer.h.{i}.{mod}.bias": shape[:1]}
    return shapes


def qkv_to_per_head(w: Rows, heads: int) -> Rows:
    """Rows q | k | v ([3, heads, head_dim]; llama.cpp's BLOOM layout) -> BLOOM's [heads, 3, head_dim]."""
    return w.reshape(3, heads, w.shape[0] // 3 // heads, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


FAMILY = Family(
    name="bloom", label="BLOOM", position="alibi", model=BloomModel, hf_architecture="BloomForCausalLM",
    hf_model_type="bloom", config_from_hf=_from_hf, config_to_hf=_to_hf, activations=("bloom_gelu",),
    shapes=_shapes,
    split_rules=(("word_embeddings.weight", "vocab"), ("lm_head.weight", "vocab"),
                 ("query_key_value.weight", "head3"), ("query_key_value.bias", "head3"),
                 ("self_attention.dense.weight", "out"), ("self_attention.dense.bias", "once"),
                 ("dense_h_to_4h.weight", "up"), ("dense_h_to_4h.bias", "up"), ("dense_4h_to_h.weight", "down"),
                 ("dense_4h_to_h.bias", "once")),
    gguf_arch="bloom", config_from_gguf=_from_gguf,
    gguf_names=GGUFNames(
        "transformer.h",
        {"token_embd": "transformer.word_embeddings", "token_embd_norm": "transformer.word_embeddings_layernorm",
         "output_norm": "transformer.ln_f", "output": "lm_head"},
        {"attn_norm": "input_layernorm", "attn_qkv": "self_attention.query_key_value",
         "attn_output": "self_attention.dense", "ffn_norm": "post_attention_layernorm",
         "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"},
        {"attn_qkv": lambda w, heads, _kv: qkv_to_per_head(w, heads)}),
    alibi_slopes=_slopes)
