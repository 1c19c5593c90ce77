"""Random weights in the shapes of a Llama-family config, made on demand, slice by slice (for benchmarks of
models nobody has on disk here: a rank makes only its own shard, never the whole 70B model).

Values are small (std 0.02; norms 1), so activations stay finite; they mean nothing.
"""

from __future__ import annotations

import zlib

import torch

from chatcore.config import ModelConfig


def llama_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    c = cfg
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
                                          "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (c.hidden_size,),
                   f"{p}.post_attention_layernorm.weight": (c.hidden_size,),
                   f"{p}.self_attn.q_proj.weight": (q, c.hidden_size),
                   f"{p}.self_attn.k_proj.weight": (kv, c.hidden_size),
                   f"{p}.self_attn.v_proj.weight": (kv, c.hidden_size),
                   f"{p}.self_attn.o_proj.weight": (c.hidden_size, q),
                   f"{p}.mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
                   f"{p}.mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
                   f"{p}.mlp.down_proj.weight": (c.hidden_size, c.intermediate_size)}
    return shapes


class RandomWeights:
    """A tensor source (``names`` / ``get`` / ``get_part``) of random weights, made on ``device`` in ``dtype``
    (on a GPU: a 70B model's shard in seconds, never through host memory)."""

    def __init__(self, cfg: ModelConfig, seed: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if cfg.family not in ("llama", "mistral", "qwen2") or cfg.qkv_bias or cfg.attention_bias or cfg.mlp_bias:
            raise ValueError("random weights are made for bias-free Llama-family configs only")
        self.shapes = llama_shapes(cfg)
        self.seed, self.device, self.dtype = seed, torch.device(device), dtype

    def names(self) -> set[str]:
        return set(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        return self.get_part(name, (slice(None),))

    def get_part(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        full = self.shapes[name]
        shape = tuple(len(range(*s.indices(n))) for s, n in zip(index + (slice(None),) * len(full), full,
                                                               strict=False))
        if len(full) == 1:
            return torch.ones(shape, device=self.device, dtype=self.dtype)
        g = torch.Generator(self.device).manual_seed(self.seed ^ zlib.crc32(repr((name, index)).encode()))
        return (torch.randn(shape, generator=g, device=self.device, dtype=self.dtype) * 0.02)
