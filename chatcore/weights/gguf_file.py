"""Read a GGUF file's tensors under Hugging Face names, dequantized to float32 (the loader casts them).

Tensor names and layouts follow llama.cpp's converter (``convert_hf_to_gguf.py`` with ``gguf``'s tensor map),
per ``general.architecture``:
- ``llama``: q and k rows reordered so each head's rotary pairs are interleaved; :func:`unpermute_qk` restores
  the half-split order transformers uses. Qwen2 / Qwen3 keep transformers' order (llama.cpp runs them with
  NeoX-style RoPE), so nothing is undone for them.
- ``bloom``: the fused ``attn_qkv`` holds all q rows, then k, then v; BLOOM's own layout interleaves them per
  head ([heads, 3, head_dim] rows), which :func:`qkv_to_per_head` restores.
- ``mpt``: the fused ``attn_qkv`` is MPT's own q | k | v, unchanged.
- ``gemma3``: RMSNorm weights are stored as 1 + w (llama.cpp multiplies by the weight; Gemma by 1 + w), so 1 is
  taken off again.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from chatcore.errors import ModelFormatError
from chatcore.weights.dequant import dequantize
from chatcore.weights.gguf_reader import GGUFFile, GGUFTensorInfo

Rows = TypeVar("Rows", torch.Tensor, np.ndarray)
Reorder = Callable[[Any], Any]  # a row reorder: packed numpy rows before dequantizing, or float tensors after


def unpermute_qk(w: Rows, heads: int) -> Rows:
    """Undo llama.cpp's q/k permutation (rows interleaved per head -> half-split per head)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qkv_to_per_head(w: Rows, heads: int) -> Rows:
    """Rows q | k | v ([3, heads, head_dim]; llama.cpp's BLOOM layout) -> BLOOM's [heads, 3, head_dim]."""
    return w.reshape(3, heads, w.shape[0] // 3 // heads, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


@dataclass(frozen=True)
class _Layout:
    """How one GGUF architecture's tensor names map to the Hugging Face names its model file reads."""

    layers: str                                   # HF prefix of block i: f"{layers}.{i}"
    top: dict[str, str]                           # GGUF stem -> HF stem, outside the blocks
    block: dict[str, str]                         # GGUF stem -> HF stem, inside a block
    reorder: dict[str, str] = field(default_factory=dict)  # GGUF stem -> "qk:q", "qk:k" or "qkv" (row reorders)
    norms_plus_one: bool = False                  # every *norm weight stored as 1 + w (Gemma)


_RMS_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_RMS_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYOUTS = {
    "llama": _Layout("model.layers", _RMS_TOP, _RMS_BLOCK, {"attn_q": "qk:q", "attn_k": "qk:k"}),
    "qwen2": _Layout("model.layers", _RMS_TOP, _RMS_BLOCK),
    "qwen3": _Layout("model.layers", _RMS_TOP, _RMS_BLOCK),
    "gemma3": _Layout("model.layers", _RMS_TOP, {
        **_RMS_BLOCK, "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm"}, norms_plus_one=True),
    "bloom": _Layout(
        "transformer.h",
        {"token_embd": "transformer.word_embeddings", "token_embd_norm": "transformer.word_embeddings_layernorm",
         "output_norm": "transformer.ln_f", "output": "lm_head"},
        {"attn_norm": "input_layernorm", "attn_qkv": "self_attention.query_key_value",
         "attn_output": "self_attention.dense", "ffn_norm": "post_attention_layernorm",
         "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"},
        {"attn_qkv": "qkv"}),
    "mpt": _Layout(
        "transformer.blocks",
        {"token_embd": "transformer.wte", "output_norm": "transformer.norm_f", "output": "lm_head"},
        {"attn_norm": "norm_1", "attn_qkv": "attn.Wqkv", "attn_output": "attn.out_proj", "ffn_norm": "norm_2",
         "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj"}),
}
GGUF_ARCHITECTURES = tuple(_LAYOUTS)
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor of architecture ``arch`` (None: a tensor we do not read)."""
    layout = _LAYOUTS[arch]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m:
        stem = layout.block.get(m.group(2))
        return None if stem is None else f"{layout.layers}.{m.group(1)}.{stem}.{m.group(3)}"
    m = _TOP_RE.fullmatch(gguf_name)
    if m and m.group(1) in layout.top:
        return f"{layout.top[m.group(1)]}.{m.group(2)}"
    return None


def _reorder(kind: str | None, num_heads: int, num_kv_heads: int) -> Reorder | None:
    if kind == "qk:q":
        return lambda w: unpermute_qk(w, num_heads)
    if kind == "qk:k":
        return lambda w: unpermute_qk(w, num_kv_heads)
    if kind == "qkv":
        return lambda w: qkv_to_per_head(w, num_heads)
    return None


class GGUFTensors:
    """Tensors of an open GGUF file (:class:`GGUFFile`; a ``gguf.GGUFReader`` works too) of architecture
    ``arch``, under HF names, with llama.cpp's row reorders undone."""

    def __init__(self, reader: GGUFFile, path: Path, num_heads: int, num_kv_heads: int, arch: str = "llama") -> None:
        if arch not in _LAYOUTS:
            raise ModelFormatError(f"GGUF architecture {arch!r} has no tensor layout here; supported: "
                                   f"{', '.join(_LAYOUTS)}")
        self.path = path
        layout = _LAYOUTS[arch]
        self._norms_plus_one = layout.norms_plus_one
        self._tensors: dict[str, tuple[GGUFTensorInfo, Reorder | None]] = {}
        unknown = []
        for t in reader.tensors:
            name = hf_name(t.name, arch)
            if name is None:
                unknown.append(t.name)
                continue
            m = _BLOCK_RE.fullmatch(t.name)
            kind = layout.reorder.get(m.group(2)) if m else None
            self._tensors[name] = (t, _reorder(kind, num_heads, num_kv_heads))
        self.unknown = sorted(unknown)

    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        entry = self._tensors.get(name)
        if entry is None:
            raise ModelFormatError(f"{self.path} lacks the tensor for {name!r}; the file is incomplete")
        t, reorder = entry
        data = t.data
        if reorder is not None and data.ndim >= 2:
            # Rows are independent in every GGUF type, so the reorder moves the packed rows (a few bytes each)
            # before dequantizing instead of the float rows after.
            data, reorder = reorder(data), None
        try:
            w = dequantize(data, t.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise ModelFormatError(
                f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be read ({exc})") from None
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if reorder is not None:
            w = reorder(w)
        if self._norms_plus_one and name.endswith("norm.weight"):
            w = w - 1.0
        return w
