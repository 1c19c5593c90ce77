"""The Llama family, and the Llama-style decoder the RoPE families share: pre-norm blocks, RoPE, GQA,
SwiGLU MLP, RMSNorm. Options switched on by the config (so Mistral, Qwen2 and Qwen3 are this block):
biases on q/k/v/o (``attention_bias``) or on q/k/v only (``qkv_bias``, Qwen2), RMSNorm of each q and k
head before RoPE (``qk_norm``, Qwen3), per-layer sliding windows (``layer_windows``, Mistral / Qwen).

Weights arrive under their Hugging Face names; q/k/v and gate/up are fused at load for fewer kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from chatcore.config import ModelConfig
from chatcore.layers.activation import gate_up_silu
from chatcore.layers.linear import for_linear, linear
from chatcore.layers.norm import rms_norm
from chatcore.layers.rope import Rotary
from chatcore.models.base import CausalLM
from chatcore.runtime import Runtime
from chatcore.step import Step

GetTensor = Callable[[str], torch.Tensor]


class Block:
    __slots__ = ("attn_norm", "wqkv", "bqkv", "wo", "bo", "q_norm", "k_norm", "window", "mlp_norm", "w_gate_up",
                 "b_gate_up", "w_down", "b_down")

    def __init__(self, get: GetTensor, prefix: str, cfg: ModelConfig, layer: int) -> None:
        a, m = f"{prefix}.self_attn", f"{prefix}.mlp"
        self.attn_norm = get(f"{prefix}.input_layernorm.weight")
        self.mlp_norm = get(f"{prefix}.post_attention_layernorm.weight")
        self.wqkv = for_linear(torch.cat([get(f"{a}.q_proj.weight"), get(f"{a}.k_proj.weight"),
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
        self.window = cfg.window(layer)
        self.w_gate_up = for_linear(torch.cat([get(f"{m}.gate_proj.weight"), get(f"{m}.up_proj.weight")]))
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

    @staticmethod
    def tensor_names(cfg: ModelConfig) -> list[str]:
        """Every Hugging Face tensor name this family reads (used to check and convert checkpoints)."""
        names = CausalLM.outer_names(cfg)
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}"
            names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
            for proj in ("q", "k", "v", "o"):
                names.append(f"{p}.self_attn.{proj}_proj.weight")
                if cfg.attention_bias or (cfg.qkv_bias and proj != "o"):
                    names.append(f"{p}.self_attn.{proj}_proj.bias")
            if cfg.qk_norm:
                names += [f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"]
            for proj in ("gate", "up", "down"):
                names.append(f"{p}.mlp.{proj}_proj.weight")
                if cfg.mlp_bias:
                    names.append(f"{p}.mlp.{proj}_proj.bias")
        return names

    def run(self, ids: torch.Tensor, step: Step, *, all_logits: bool = False) -> torch.Tensor:
        c, eps = self.cfg, self.cfg.rms_norm_eps
        t = ids.shape[0]
        row_linear = self.row_linear
        x = self.embed_ids(ids, self.embed)
        for i, layer in enumerate(self.layers):
            # the attention input's RMSNorm runs inside the qkv projection (for one token on a GPU: one GEMV)
            qkv = linear(x, layer.wqkv, layer.bqkv, norm=(layer.attn_norm, eps))
            q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            q, k = q.view(t, c.num_heads, c.head_dim), k.view(t, c.num_kv_heads, c.head_dim)
            if layer.q_norm is not None:
                q, k = rms_norm(q, layer.q_norm, eps), rms_norm(k, layer.k_norm, eps)
            o = step.attend(i, q, k, v.view(t, c.num_kv_heads, c.head_dim), rotary=self.rotary, window=layer.window)
            # each residual add in the GEMV before it (epilogue), each norm in the GEMV after it (prologue):
            # for one token on a GPU, no kernel of their own
            x = row_linear(o.reshape(t, self.q_size), layer.wo, layer.bo, residual=x)
            up = gate_up_silu(x, layer.w_gate_up, layer.b_gate_up, norm=(layer.mlp_norm, eps))
            x = row_linear(up, layer.w_down, layer.b_down, residual=x)
        h = rms_norm(x, self.norm, eps)
        return self.head(h if all_logits else h[-1:], self.lm_head)
