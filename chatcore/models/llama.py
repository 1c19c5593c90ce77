"""The Llama family, and the Llama-style decoder the RoPE families share: pre-norm blocks, RoPE, GQA,
SwiGLU MLP, RMSNorm. Options switched on by the config (so Mistral, Qwen2 and Qwen3 are this block):
biases on q/k/v/o (``attention_bias``) or on q/k/v only (``qkv_bias``, Qwen2), RMSNorm of each q and k
head before RoPE (``qk_norm``, Qwen3), per-layer sliding windows (``sliding_windows``, Mistral / Qwen).

Weights arrive under their Hugging Face names; q/k/v and gate/up are fused at load for fewer kernels (packed
weights stay packed: :func:`chatcore.quant.weight.fuse_rows`).

Also the declarations those families share (config.json fields, tensor shapes, GGUF names, tensor-parallel
splits). GGUF ``llama`` files have their q and k rows reordered by llama.cpp so each head's rotary pairs are
interleaved; :func:`unpermute_qk` restores the half-split order transformers uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from chatcore.config import ModelConfig, as_ids, hf_rope
from chatcore.config_gguf import rope_fields
from chatcore.layers.activation import gate_up_silu
from chatcore.layers.linear import for_linear, linear
from chatcore.layers.norm import add_rms_norm, rms_norm, use_fused
from chatcore.layers.rope import Rotary
from chatcore.models.base import CausalLM
from chatcore.models.family import Family, Fields, GetTensor, tied_head
from chatcore.quant.weight import fuse_rows
from chatcore.runtime import Runtime
from chatcore.step import Step
from chatcore.weights.gguf_names import GGUFNames, Rows


class Block:
    __slots__ = ("attn_norm", "wqkv", "bqkv", "wo", "bo", "q_norm", "k_norm", "sliding_window", "mlp_norm", "w_gate_up",
                 "b_gate_up", "w_down", "b_down")

    def __init__(self, get: GetTensor, prefix: str, cfg: ModelConfig, layer: int) -> None:
        a, m = f"{prefix}.self_attn", f"{prefix}.mlp"
        self.attn_norm = get(f"{prefix}.input_layernorm.weight")
        self.mlp_norm = get(f"{prefix}.post_attention_layernorm.weight")
        self.wqkv = for_linear(fuse_rows([get(f"{a}.q_proj.weight"), get(f"{a}.k_proj.weight"),
                                          get(f"{a}.v_proj.weight")]))
        self.wo = for_linear(get(f"{a}.o_proj.weight"))
        self.bqkv = self.bo = None
        if cfg.attention_bias or cfg.qkv_bias:
            self.bqkv = torch.cat([get(f"{a}.q_proj.bias"), get(f"{a}.k_proj.bias"), get(f"{a}.v_proj.bias")])
        if cfg.attention_bias:
            self.bo = get(f"{a}.o_proj.bias")
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm, self.k_norm = get(f"{a}.q_norm.weight"), get(f"{a}.k_norm.weight")
        self.sliding_window = cfg.sliding_window(layer)
        self.w_gate_up = for_linear(fuse_rows([get(f"{m}.gate_proj.weight"), get(f"{m}.up_proj.weight")]))
        self.w_down = for_linear(get(f"{m}.down_proj.weight"))
        self.b_gate_up = self.b_down = None
        if cfg.mlp_bias:
            self.b_gate_up = torch.cat([get(f"{m}.gate_proj.bias"), get(f"{m}.up_proj.bias")])
            self.b_down = get(f"{m}.down_proj.bias")


class LlamaModel(CausalLM):
    """A loaded Llama-style model; :meth:`run` takes T new tokens of one sequence through a cache step."""

    def __init__(self, cfg: ModelConfig, runtime: Runtime, get: GetTensor, backend: str) -> None:
        self.cfg, self.runtime, self.backend = cfg, runtime, backend
        self.embed = get("model.embed_tokens.weight")
        self.layers = [Block(get, f"model.layers.{i}", cfg, i) for i in range(cfg.num_layers)]
        self.norm = get("model.norm.weight")
        self.lm_head = for_linear(self.embed if cfg.tie_word_embeddings else get("lm_head.weight"))
        self.rotary = Rotary(cfg, runtime.max_seq_len, runtime.device)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim

    def run(self, ids: torch.Tensor, step: Step, *, all_logits: bool = False) -> torch.Tensor:
        c, eps = self.cfg, self.cfg.rms_norm_eps
        t = ids.shape[0]
        row_linear = self.row_linear
        x = self.embed_ids(ids, self.embed, self.runtime.dtype)
        # one token: each residual add in the GEMV before it (epilogue), each norm in the GEMV after it
        # (prologue), no kernel of their own. Several rows on a GPU (batched decode, prompt chunks): each residual
        # add and the norm after it in one kernel (add_rms_norm), the same roundings as the two ops
        paired = t > 1 and use_fused(x) and x.dim() == 2
        h = rms_norm(x, self.layers[0].attn_norm, eps) if paired and self.layers else None
        for i, layer in enumerate(self.layers):
            if paired:
                qkv = linear(h, layer.wqkv, layer.bqkv)
            else:
                qkv = linear(x, layer.wqkv, layer.bqkv, norm=(layer.attn_norm, eps))
            q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            q, k = q.view(t, c.num_heads, c.head_dim), k.view(t, c.num_kv_heads, c.head_dim)
            if layer.q_norm is not None:
                q, k = rms_norm(q, layer.q_norm, eps), rms_norm(k, layer.k_norm, eps)
            o = step.attend(i, q, k, v.view(t, c.num_kv_heads, c.head_dim), rotary=self.rotary,
                            sliding_window=layer.sliding_window)
            if paired:
                x, h = add_rms_norm(x, row_linear(o.reshape(t, self.q_size), layer.wo, layer.bo), layer.mlp_norm,
                                    eps)
                up = gate_up_silu(h, layer.w_gate_up, layer.b_gate_up)
                after = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.norm
                x, h = add_rms_norm(x, row_linear(up, layer.w_down, layer.b_down), after, eps)
            else:
                x = row_linear(o.reshape(t, self.q_size), layer.wo, layer.bo, residual=x)
                up = gate_up_silu(x, layer.w_gate_up, layer.b_gate_up, norm=(layer.mlp_norm, eps))
                x = row_linear(up, layer.w_down, layer.b_down, residual=x)
        if h is None:
            h = rms_norm(x, self.norm, eps)
        return self.head(step.select(h, all_logits), self.lm_head)


# -- what the Llama-style families declare (Mistral, Qwen2, Qwen3 and Gemma 3 reuse parts of it) -------------

def llama_style_fields(raw: Mapping[str, Any]) -> Fields:
    """The fields of a Llama-style ``config.json`` (Mistral's, Qwen's add windows and biases to these)."""
    hidden = int(raw["hidden_size"])
    heads = int(raw["num_attention_heads"])
    rope_theta, scaling = hf_rope(raw)
    return dict(
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
        eos_token_ids=as_ids(raw.get("eos_token_id")),
    )


def llama_style_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A Llama-style config's own ``config.json`` fields (without sliding windows)."""
    out: dict[str, Any] = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "hidden_act": cfg.hidden_act,
    }
    if cfg.rope_scaling.kind != "default":
        out["rope_scaling"] = {"rope_type": cfg.rope_scaling.kind, "factor": cfg.rope_scaling.factor,
                               **dict(cfg.rope_scaling.params)}
    return out


def outer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors around the layers of a ``model.*`` checkpoint: embedding, final norm, and the head unless
    it is tied to the embedding."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
                                          "model.norm.weight": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(rows, columns) of the attention (q, k, v, o) and MLP (gate, up, down) projections."""
    h, mlp = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (mlp, h), "up": (mlp, h), "down": (h, mlp)}


def llama_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes, proj = outer_shapes(cfg), projection_shapes(cfg)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (cfg.hidden_size,),
                   f"{p}.post_attention_layernorm.weight": (cfg.hidden_size,)}
        for x in "qkvo":
            shapes[f"{p}.self_attn.{x}_proj.weight"] = proj[x]
            if cfg.attention_bias or (cfg.qkv_bias and x != "o"):
                shapes[f"{p}.self_attn.{x}_proj.bias"] = proj[x][:1]
        if cfg.qk_norm:
            shapes |= {f"{p}.self_attn.q_norm.weight": (cfg.head_dim,), f"{p}.self_attn.k_norm.weight": (cfg.head_dim,)}
        for x in ("gate", "up", "down"):
            shapes[f"{p}.mlp.{x}_proj.weight"] = proj[x]
            if cfg.mlp_bias:
                shapes[f"{p}.mlp.{x}_proj.bias"] = proj[x][:1]
    return shapes


def llama_style_settings(cfg: ModelConfig, names: set[str]) -> ModelConfig:
    """A tied head, and biases on the attention (q/k/v only, or o too) and MLP projections."""
    cfg = tied_head(cfg, names)
    block = "model.layers.0"
    o_bias = f"{block}.self_attn.o_proj.bias" in names
    return dataclasses.replace(cfg, attention_bias=o_bias,
                               qkv_bias=not o_bias and f"{block}.self_attn.q_proj.bias" in names,
                               mlp_bias=f"{block}.mlp.up_proj.bias" in names)


def unpermute_qk(w: Rows, heads: int) -> Rows:
    """Undo llama.cpp's q/k permutation (rows interleaved per head -> half-split per head)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = GGUFNames(
    "model.layers",
    {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"},
    {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
     "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
     "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
     "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"},
    {"attn_q": lambda w, heads, _kv: unpermute_qk(w, heads), "attn_k": lambda w, _heads, kv: unpermute_qk(w, kv)})

SPLIT_RULES = (
    ("embed_tokens.weight", "vocab"), ("lm_head.weight", "vocab"), ("q_proj.weight", "q"), ("q_proj.bias", "q"),
    ("k_proj.weight", "kv"), ("k_proj.bias", "kv"), ("v_proj.weight", "kv"), ("v_proj.bias", "kv"),
    ("o_proj.weight", "out"), ("o_proj.bias", "once"), ("gate_proj.weight", "up"), ("gate_proj.bias", "up"),
    ("up_proj.weight", "up"), ("up_proj.bias", "up"), ("down_proj.weight", "down"), ("down_proj.bias", "once"))

FAMILY = Family(
    name="llama", label="Llama (Llama 2, Llama 3/3.1/3.2, SmolLM/SmolLM2)", position="rope", model=LlamaModel,
    hf_architecture="LlamaForCausalLM", hf_model_type="llama", config_from_hf=llama_style_fields,
    config_to_hf=llama_style_hf, activations=("silu", "swish"), shapes=llama_shapes, split_rules=SPLIT_RULES,
    gguf_arch="llama", config_from_gguf=rope_fields, gguf_names=GGUF_NAMES, settings_from_tensors=llama_style_settings)
