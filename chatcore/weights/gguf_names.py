"""How one family's GGUF tensor names map to the Hugging Face names its model reads (each family declares
its own :class:`GGUFNames`; :class:`chatcore.weights.gguf_file.GGUFTensors` serves a file through it)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

Rows = TypeVar("Rows", torch.Tensor, np.ndarray)
# A row reorder, given (rows, num_heads, num_kv_heads): packed numpy rows before dequantizing, or float tensors
# after (rows are independent in every GGUF type, so both give the same result).
Reorder = Callable[[Any, int, int], Any]

_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass(frozen=True)
class GGUFNames:
    """GGUF stems (``token_embd``, ``blk.<i>.attn_q``) -> HF stems, and what llama.cpp changed in the rows."""

    layers: str                                   # HF prefix of block i: f"{layers}.{i}"
    top: Mapping[str, str]                        # GGUF stem -> HF stem, outside the blocks
    block: Mapping[str, str]                      # GGUF stem -> HF stem, inside a block
    reorder: Mapping[str, Reorder] = field(default_factory=dict)  # GGUF block stem -> how its rows are restored
    norms_plus_one: bool = False                  # every *norm weight stored as 1 + w (Gemma)

    def hf_name(self, gguf_name: str) -> str | None:
        """The Hugging Face name of a GGUF tensor (None: a tensor we do not read)."""
        m = _BLOCK_RE.fullmatch(gguf_name)
        if m:
            stem = self.block.get(m.group(2))
            return None if stem is None else f"{self.layers}.{m.group(1)}.{stem}.{m.group(3)}"
        m = _TOP_RE.fullmatch(gguf_name)
        if m and m.group(1) in self.top:
            return f"{self.top[m.group(1)]}.{m.group(2)}"
        return None

    def reorder_of(self, gguf_name: str) -> Reorder | None:
        """How the rows of a GGUF tensor are put back in the HF order (None: they are in it already)."""
        m = _BLOCK_RE.fullmatch(gguf_name)
        return self.reorder.get(m.group(2)) if m else None
