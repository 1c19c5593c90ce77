"""What a model holds as a weight, and the weight-level operations the model families and tensor parallel do at
load: a dense tensor, a :class:`~chatcore.quant.packed.PackedWeight`, or :class:`RowParts` (rows of different
formats stacked, such as a Q4_K_M file's q/k in Q4_K and v in Q6_K fused into one qkv projection).

Every helper here keeps a packed weight packed: fusing, reordering or slicing rows moves the planes' rows,
never dequantized values. :func:`dense` is the one place a packed weight becomes values (a prompt chunk's
projection; nothing it returns is kept).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatcore.quant.packed import PackedWeight, cat_rows, dequantize


@dataclass(frozen=True, eq=False)
class RowParts:
    """Weights of one width stacked by rows that cannot be one tensor (different formats): its product is each
    part's product, concatenated (:func:`chatcore.layers.linear.linear` runs it so)."""

    parts: tuple[torch.Tensor | PackedWeight, ...]

    def __post_init__(self) -> None:
        widths = {p.shape[1] for p in self.parts}
        if len(widths) != 1:
            raise ValueError(f"RowParts takes parts of one width, got {sorted(widths)}")

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    @property
    def sizes(self) -> list[int]:
        """Rows of each part, in order (how a fused bias or output splits)."""
        return [p.shape[0] for p in self.parts]

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def nbytes(self) -> int:
        return sum(weight_nbytes(p) for p in self.parts)

    def to(self, device: torch.device | str) -> RowParts:
        return RowParts(tuple(p.to(device) for p in self.parts))

    def take_rows(self, index: torch.Tensor) -> torch.Tensor | PackedWeight | RowParts:
        """Rows ``index`` in that order, as one weight where the rows come from one part (else dense values are
        never made: each run of rows from one part stays that part's format)."""
        bounds = torch.tensor([0, *self.sizes], device=index.device).cumsum(0)
        part = torch.bucketize(index, bounds[1:], right=True)
        pieces: list[torch.Tensor | PackedWeight] = []
        start = 0
        flat = part.tolist()
        for i in range(1, len(flat) + 1):
            if i == len(flat) or flat[i] != flat[start]:
                p = flat[start]
                local = index[start:i] - bounds[p]
                pieces.append(take_rows(self.parts[p], local))
                start = i
        return fuse_rows(pieces)


Weight = torch.Tensor | PackedWeight | RowParts


class BlockCutError(ValueError):
    """A column slice of a packed weight that would cut one of its format's blocks."""

    def __init__(self, fmt: str, unit: int, start: int, stop: int) -> None:
        super().__init__(f"{fmt}: columns {start}..{stop} do not lie on {unit}-column block boundaries")
        self.fmt, self.unit = fmt, unit


def _columns(w: torch.Tensor | PackedWeight, start: int, stop: int) -> torch.Tensor | PackedWeight:
    if isinstance(w, torch.Tensor):
        return w[:, start:stop].clone()
    unit = max(w.fmt.block, 32)
    if start % unit or stop % unit:
        raise BlockCutError(w.fmt.name, unit, start, stop)
    cut = w.columns(start, stop)   # views of the whole weight's planes: copied, so the shard holds only its part
    return dataclasses.replace(cut, **{k: v.clone() for k, v in cut.planes().items()})


def _same_layout(ws: Sequence[PackedWeight]) -> bool:
    first = ws[0]
    return all(w.fmt == first.fmt and w.shape[1] == first.shape[1]
               and {k: t.dtype for k, t in w.planes().items()} == {k: t.dtype for k, t in first.planes().items()}
               for w in ws)


def fuse_rows(ws: Sequence[Weight]) -> Weight:
    """``ws`` (one width) stacked by rows, as one weight: a tensor (``torch.cat``), a packed weight (all packed in
    one format: their planes concatenated), else :class:`RowParts` (nested parts flattened, runs of one packed
    format merged)."""
    flat: list[torch.Tensor | PackedWeight] = []
    for w in ws:
        flat.extend(w.parts if isinstance(w, RowParts) else (w,))
    if all(isinstance(w, torch.Tensor) for w in flat):
        return torch.cat(flat)   # type: ignore[arg-type]
    merged: list[torch.Tensor | PackedWeight] = []
    for w in flat:
        last = merged[-1] if merged else None
        if isinstance(w, PackedWeight) and isinstance(last, PackedWeight) and _same_layout([last, w]):
            merged[-1] = cat_rows([last, w])
        elif isinstance(w, torch.Tensor) and isinstance(last, torch.Tensor):
            merged[-1] = torch.cat([last, w])
        else:
            merged.append(w)
    return merged[0] if len(merged) == 1 else RowParts(tuple(merged))


def take_rows(w: Weight, index: torch.Tensor) -> Weight:
    """Rows ``index`` (int64 [R]) of ``w`` in that order (a packed weight stays packed: each plane's rows)."""
    if isinstance(w, torch.Tensor):
        return w.index_select(0, index)
    index = index.to(w.device)
    if isinstance(w, RowParts):
        return w.take_rows(index)
    return dataclasses.replace(w, shape=(index.shape[0], w.shape[1]),
                               **{k: v.index_select(0, index) for k, v in w.planes().items()})


def reorder_rows(w: Weight, reorder: Callable[[torch.Tensor], torch.Tensor]) -> Weight:
    """``reorder`` (a function of a tensor's rows, such as BLOOM's per-head regrouping) applied to ``w``: on a
    tensor itself; on a packed weight through the row permutation it makes of ``arange(rows)``."""
    if isinstance(w, torch.Tensor):
        return reorder(w)
    return take_rows(w, reorder(torch.arange(w.shape[0])))


def slice_weight(w: Weight, index: tuple[slice, ...]) -> Weight:
    """``w[index]`` (a rows slice, then optionally a columns slice; step 1) as a new weight, packed kept packed.
    A packed column slice must lie on the format's block boundaries (:class:`BlockCutError` otherwise)."""
    if isinstance(w, torch.Tensor):
        return w[index].clone()
    n, k = w.shape
    rows = index[0].indices(n) if index else (0, n, 1)
    cols = index[1].indices(k) if len(index) > 1 else (0, k, 1)
    if rows[2] != 1 or cols[2] != 1:
        raise ValueError("a packed weight is sliced in steps of 1")
    out = w if rows[:2] == (0, n) else take_rows(w, torch.arange(rows[0], rows[1]))
    if cols[:2] == (0, k):
        return out
    if isinstance(out, RowParts):
        return RowParts(tuple(_columns(p, cols[0], cols[1]) for p in out.parts))
    return _columns(out, cols[0], cols[1])


def pad_rows(w: Weight, rows: int) -> Weight:
    """``w`` with zero rows appended up to ``rows`` rows (a packed weight's padding: all-zero planes, whose scale
    d = 0 makes each padded value 0 in every format)."""
    extra = rows - w.shape[0]
    if extra <= 0:
        return w
    if isinstance(w, torch.Tensor):
        return torch.cat([w, w.new_zeros((extra, *w.shape[1:]))])
    if isinstance(w, RowParts):
        last = w.parts[-1]
        return RowParts((*w.parts[:-1], pad_rows(last, last.shape[0] + extra)))   # type: ignore[arg-type]
    zeros = {k: t.new_zeros((extra, *t.shape[1:])) for k, t in w.planes().items()}
    return cat_rows([w, PackedWeight(w.fmt, (extra, w.shape[1]), **zeros)])


def dense(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """The values of ``w`` in ``dtype`` (CUDA: the Triton dequantize kernel; elsewhere the reference
    :func:`~chatcore.quant.packed.dequantize`, which it equals)."""
    if isinstance(w, torch.Tensor):
        return w.to(dtype)
    if isinstance(w, RowParts):
        return torch.cat([dense(p, dtype) for p in w.parts])
    if w.device.type == "cuda":
        from chatcore.layers.triton_dequant import dequantize_to

        return dequantize_to(w, dtype)
    return dequantize(w, dtype)


def embedding(ids: torch.Tensor, w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """The embedding rows of ``ids`` [T] -> [T, hidden]: a tensor's rows as they are; a packed table's rows
    gathered packed, and only those dequantized to ``dtype``."""
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w)
    rows = take_rows(w, ids.reshape(-1).long())
    return dequantize(rows, dtype) if isinstance(rows, PackedWeight) else dense(rows, dtype)


def weight_nbytes(w: Weight) -> int:
    """Bytes ``w`` holds in memory (a packed weight: its planes)."""
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return w.nbytes()
