"""Quantize-on-load: a tensor source whose projections come back as packed weights
(:func:`chatcore.quant.quantize.quantize`), made on the runtime's device as each is read."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from chatcore.quant.packed import PackedWeight
from chatcore.quant.quantize import fit_group, quantize, quantized_nbytes
from chatcore.weights import TensorSource


class QuantizingSource:
    """``base`` with the tensors ``names`` quantized by ``mode`` on ``device``; every other tensor is ``base``'s,
    unchanged. int4 takes ``group`` columns, or where a tensor's width is not a multiple of it the group
    :func:`~chatcore.quant.quantize.fit_group` gives for that width (:meth:`group_of`). A part (``get_part``, a
    tensor-parallel rank's shard) is quantized as the part with the whole tensor's group: rows quantize as they
    would in the whole matrix, columns must lie on groups."""

    def __init__(self, base: TensorSource, names: Iterable[str], mode: str, group: int,
                 device: torch.device) -> None:
        self.base, self.mode, self.group, self.device = base, mode, group, device
        self.quantized = frozenset(names)

    def names(self) -> set[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def group_of(self, name: str) -> int:
        """The int4 group tensor ``name`` is quantized with (``group`` where its width allows)."""
        return fit_group(self.shape(name)[-1], self.group) if self.mode == "int4" else self.group

    def _pack(self, w: torch.Tensor, name: str) -> PackedWeight:
        return quantize(w.to(self.device), self.mode, self.group_of(name))

    def get(self, name: str) -> torch.Tensor | PackedWeight:  # type: ignore[override]
        w = self.base.get(name)
        return self._pack(w, name) if name in self.quantized else w

    def get_part(self, name: str, index: tuple[slice, ...]) -> torch.Tensor | PackedWeight:
        part = getattr(self.base, "get_part", None)
        if name not in self.quantized:
            return part(name, index) if part is not None else self.base.get(name)[index].clone()
        if part is not None:
            return self._pack(part(name, index), name)
        return self._pack(self.base.get(name), name)[index].clone()

    def packed_nbytes(self, name: str) -> int | None:
        """Bytes ``get(name)`` takes when it is packed (None: a float tensor)."""
        if name in self.quantized:
            return quantized_nbytes(self.shape(name), self.mode, self.group_of(name))  # type: ignore[arg-type]
        inner = getattr(self.base, "packed_nbytes", None)
        return inner(name) if inner is not None else None
