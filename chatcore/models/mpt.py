"""MPT: ALiBi (MPT's slope rule, ``alibi_bias_max``), bias-free LayerNorms and linears, a fused Wqkv
(q | k | v) optionally clamped (``clip_qkv``), an optional ``softmax_scale``, an exact-GELU MLP of
4 x hidden, tied output head (as transformers' ``MptForCausalLM`` runs it). One difference: we honour
``attn_config.alibi_bias_max`` as MosaicML's own code does; transformers always uses 8 (every released
MPT checkpoint has 8, so they agree on real models).

The KV cache holds keys as computed (no rotation), so dropping a span only moves them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from chatcore.config import ModelConfig
from chatcore.layers.alibi import mpt_slopes
from chatcore.layers.linear import for_linear, linear
from chatcore.layers.norm import layer_norm
from chatcore.models.base import CausalLM
from chatcore.models.llama import GetTensor
from chatcore.runtime import Runtime
from chatcore.step import Step


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
        self.slopes = mpt_slopes(cfg.num_heads, cfg.alibi_bias_max).to(runtime.device)
        # the attention entry point scales scores by 1/sqrt(head_dim); a different softmax_scale goes into q
        self.q_scale = None if cfg.softmax_scale is None else cfg.softmax_scale * math.sqrt(cfg.head_dim)
        self.rotary = None

    @staticmethod
    def tensor_names(cfg: ModelConfig) -> list[str]:
        names = ["transformer.wte.weight", "transformer.norm_f.weight"]
        if not cfg.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(cfg.num_layers):
            names += [f"transformer.blocks.{i}.{m}.weight" for m in
                      ("norm_1", "attn.Wqkv", "attn.out_proj", "norm_2", "ffn.up_proj", "ffn.down_proj")]
        return names

    def run(self, ids: torch.Tensor, step: Step, *, all_logits: bool = False) -> torch.Tensor:
        c, eps = self.cfg, self.cfg.rms_norm_eps
        t = ids.shape[0]
        row_linear = self.row_linear
        x = self.embed_ids(ids, self.embed)
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
        if not all_logits:
            x = x[-1:]
        return self.head(layer_norm(x, self.norm_f, None, eps), self.lm_head)
