"""Read a GGUF file's tensors under Hugging Face names, dequantized to float32 (the loader casts them).

The names and row layouts are the family's (its :class:`~chatcore.weights.gguf_names.GGUFNames`, which
follows llama.cpp's converter ``convert_hf_to_gguf.py`` with ``gguf``'s tensor map for that architecture).
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatcore.errors import ModelFormatError
from chatcore.weights.dequant import dequantize
from chatcore.weights.gguf_names import GGUFNames, Reorder
from chatcore.weights.gguf_reader import GGUFFile, GGUFTensorInfo


class GGUFTensors:
    """Tensors of an open GGUF file (:class:`GGUFFile`; a ``gguf.GGUFReader`` works too) under the HF names
    ``names`` gives them, with llama.cpp's row reorders undone."""

    def __init__(self, reader: GGUFFile, path: Path, num_heads: int, num_kv_heads: int, names: GGUFNames) -> None:
        self.path = path
        self._norms_plus_one = names.norms_plus_one
        self._heads = (num_heads, num_kv_heads)
        self._tensors: dict[str, tuple[GGUFTensorInfo, Reorder | None]] = {}
        unknown = []
        for t in reader.tensors:
            name = names.hf_name(t.name)
            if name is None:
                unknown.append(t.name)
                continue
            self._tensors[name] = (t, names.reorder_of(t.name))
        self.unknown = sorted(unknown)

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name][0].shape))

    def get(self, name: str) -> torch.Tensor:
        entry = self._tensors.get(name)
        if entry is None:
            raise ModelFormatError(f"{self.path} lacks the tensor for {name!r}; the file is incomplete")
        t, reorder = entry
        data = t.data
        if reorder is not None and data.ndim >= 2:
            # Rows are independent in every GGUF type, so the reorder moves the packed rows (a few bytes each)
            # before dequantizing instead of the float rows after.
            data, reorder = reorder(data, *self._heads), None
        try:
            w = dequantize(data, t.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise ModelFormatError(
                f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be read ({exc})") from None
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if reorder is not None:
            w = reorder(w, *self._heads)
        if self._norms_plus_one and name.endswith("norm.weight"):
            w = w - 1.0
        return w
