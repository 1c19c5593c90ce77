"""Read a GGUF file's tensors under Hugging Face names, dequantized to float32 (the loader casts them), or,
served packed (:meth:`GGUFTensors.packed_on`), the 2-D tensors of the types with a packed layout as
:class:`~chatcore.quant.packed.PackedWeight` (lossless: :mod:`chatcore.quant.gguf_pack`).

The names and row layouts are the family's (its :class:`~chatcore.weights.gguf_names.GGUFNames`, which
follows llama.cpp's converter ``convert_hf_to_gguf.py`` with ``gguf``'s tensor map for that architecture).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from chatcore.errors import ModelFormatError
from chatcore.quant.gguf_pack import PACKABLE, pack_gguf, packed_size
from chatcore.quant.packed import PackedWeight
from chatcore.weights.dequant import dequantize
from chatcore.weights.gguf_names import GGUFNames, Reorder
from chatcore.weights.gguf_reader import GGUFFile, GGUFTensorInfo

FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                         GGMLQuantizationType.F64})


class GGUFTensors:
    """Tensors of an open GGUF file (:class:`GGUFFile`; a ``gguf.GGUFReader`` works too) under the HF names
    ``names`` gives them, with llama.cpp's row reorders undone."""

    _pack_on: torch.device | None = None   # packed_on's device: where packed tensors are made (None: never)

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

    def type_of(self, name: str) -> GGMLQuantizationType:
        return self._tensors[name][0].tensor_type

    def packed_on(self, device: torch.device | str) -> GGUFTensors:
        """This file served packed: :meth:`get` gives a :class:`PackedWeight`, made on ``device``, for every
        2-D tensor of a type in :data:`~chatcore.quant.gguf_pack.PACKABLE` (projections, embedding, output
        head); other types, 1-D tensors and float tensors come dequantized as before."""
        view = copy.copy(self)
        view._pack_on = torch.device(device)
        return view

    def packs(self, name: str) -> bool:
        """Whether :meth:`get` serves ``name`` packed."""
        t = self._tensors[name][0]
        return self._pack_on is not None and t.tensor_type in PACKABLE and len(t.shape) == 2

    def packed_nbytes(self, name: str) -> int | None:
        """Bytes ``get(name)`` takes when it is packed (None: a float tensor)."""
        return packed_size(self.type_of(name), self.shape(name)) if self.packs(name) else None  # type: ignore[arg-type]

    def get(self, name: str) -> torch.Tensor | PackedWeight:  # type: ignore[override]
        entry = self._tensors.get(name)
        if entry is None:
            raise ModelFormatError(f"{self.path} lacks the tensor for {name!r}; the file is incomplete")
        t, reorder = entry
        data = t.data
        if reorder is not None and data.ndim >= 2:
            # Rows are independent in every GGUF type, so the reorder moves the packed rows (a few bytes each)
            # before dequantizing instead of the float rows after.
            data, reorder = reorder(data, *self._heads), None
        if self.packs(name):
            return pack_gguf(self._raw(data), t.tensor_type, self.shape(name))  # type: ignore[arg-type]
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

    def _raw(self, data: np.ndarray) -> torch.Tensor:
        """A tensor's GGUF bytes on the packing device (the packed planes are copies: nothing keeps the map)."""
        arr = np.ascontiguousarray(data)
        with warnings.catch_warnings():   # a read-only map is only read: the copy to the device takes the bytes
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr).to(self._pack_on)  # type: ignore[arg-type]
