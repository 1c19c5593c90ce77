"""BLOOM: ALiBi instead of RoPE, LayerNorms with biases (one more right after the embeddings), a fused
query_key_value projection laid out per head ([heads, 3, head_dim] rows; regrouped to q | k | v at load),
a tanh-GELU MLP of 4 x hidden, biases everywhere, tied output head.

The KV cache holds keys as computed (no rotation), so dropping a span only moves them.
"""

from __future__ import annotations

import torch

from chatcore.config import ModelConfig
from chatcore.layers.alibi import bloom_slopes
from chatcore.layers.linear import for_linear, linear
from chatcore.layers.norm import layer_norm
from chatcore.models.base import CausalLM
from chatcore.models.llama import GetTensor
from chatcore.runtime import Runtime
from chatcore.step import Step


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
        self.wqkv = for_linear(_per_head_to_qkv(get(f"{p}.self_attention.query_key_value.weight"), h))
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
        self.slopes = bloom_slopes(cfg.num_heads).to(runtime.device)
        self.rotary = None

    @staticmethod
    def tensor_names(cfg: ModelConfig) -> list[str]:
        names = ["transformer.word_embeddings.weight"]
        for ln in ("transformer.word_embeddings_layernorm", "transformer.ln_f"):
            names += [f"{ln}.weight", f"{ln}.bias"]
        if not cfg.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(cfg.num_layers):
            for mod in ("input_layernorm", "self_attention.query_key_value", "self_attention.dense",
                        "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
                names += [f"transformer.h.{i}.{mod}.weight", f"transformer.h.{i}.{mod}.bias"]
        return names

    def run(self, ids: torch.Tensor, step: Step, *, all_logits: bool = False) -> torch.Tensor:
        c, eps = self.cfg, self.cfg.rms_norm_eps
        t = ids.shape[0]
        row_linear = self.row_linear
        x = layer_norm(self.embed_ids(ids, self.embed), self.embed_ln_w, self.embed_ln_b, eps)
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
        if not all_logits:
            x = x[-1:]
        return self.head(layer_norm(x, self.ln_f_w, self.ln_f_b, eps), self.lm_head)
