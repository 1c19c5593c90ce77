"""Read a GGUF file's tensors under Hugging Face names, dequantized to float32 (the loader casts them).

Tensor names and the q/k row permutation follow llama.cpp's converter: it reorders the rows of q and k
so each head's rotary pairs are interleaved; :func:`unpermute_qk` restores the half-split order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from chatcore.errors import ModelFormatError
from chatcore.weights.dequant import dequantize
from chatcore.weights.gguf_reader import GGUFFile, GGUFTensorInfo

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


Rows = TypeVar("Rows", torch.Tensor, np.ndarray)


def unpermute_qk(w: Rows, heads: int) -> Rows:
    """Undo llama.cpp's q/k permutation (rows interleaved per head -> half-split per head)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFTensors:
    """Tensors of an open GGUF file (:class:`GGUFFile`; a ``gguf.GGUFReader`` works too), under HF names;
    q/k un-permuted for the Llama family."""

    def __init__(self, reader: GGUFFile, path: Path, num_heads: int, num_kv_heads: int) -> None:
        self.path = path
        self.heads = {"q_proj": num_heads, "k_proj": num_kv_heads}
        self._tensors: dict[str, GGUFTensorInfo] = {}
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
        self.unknown = sorted(t.name for t in reader.tensors if hf_name(t.name) is None)

    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        t = self._tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{self.path} lacks the tensor for {name!r}; the file is incomplete")
        heads = self.heads.get(name.split(".")[-2])
        data = t.data
        if heads is not None and data.ndim >= 2:
            # Rows are independent in every GGUF type, so the permutation moves the packed rows (a few
            # bytes each) before dequantizing instead of the float rows after.
            data = unpermute_qk(data, heads)
            heads = None
        try:
            w = dequantize(data, t.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise ModelFormatError(
                f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be read ({exc})") from None
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        return w if heads is None else unpermute_qk(w, heads)
