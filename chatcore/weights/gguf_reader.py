"""A small, fast GGUF reader (versions 2 and 3, little-endian) over ``numpy.memmap``.

``gguf.GGUFReader`` builds numpy views for every element of every metadata array, which costs seconds on a
tokenizer's ~100k strings. This reader decodes the metadata straight into plain Python values (one pass over the
bytes per string array), and the tensor data as memory-mapped views shaped the way ``gguf.GGUFReader`` shapes
them, so ``gguf.quants.dequantize(t.data, t.tensor_type)`` works unchanged.

    f = GGUFFile("model.gguf")
    f.metadata["general.architecture"]           # plain str / int / float / bool / lists of those
    for t in f.tensors: t.name, t.tensor_type, t.shape, t.data

Malformed files raise ``ValueError`` with a one-line message.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

__all__ = ["GGUFFile", "GGUFTensorInfo", "SUPPORTED_VERSIONS"]

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses tensors with more
MAX_NESTING = 8  # arrays of arrays are rare; the bound keeps a crafted file from recursing deeply

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALARS: dict[int, tuple[struct.Struct, np.dtype]] = {
    GGUFValueType.UINT8: (struct.Struct("<B"), np.dtype("<u1")),
    GGUFValueType.INT8: (struct.Struct("<b"), np.dtype("<i1")),
    GGUFValueType.UINT16: (struct.Struct("<H"), np.dtype("<u2")),
    GGUFValueType.INT16: (struct.Struct("<h"), np.dtype("<i2")),
    GGUFValueType.UINT32: (struct.Struct("<I"), np.dtype("<u4")),
    GGUFValueType.INT32: (struct.Struct("<i"), np.dtype("<i4")),
    GGUFValueType.FLOAT32: (struct.Struct("<f"), np.dtype("<f4")),
    GGUFValueType.UINT64: (struct.Struct("<Q"), np.dtype("<u8")),
    GGUFValueType.INT64: (struct.Struct("<q"), np.dtype("<i8")),
    GGUFValueType.FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
}
# Tensor types that gguf.GGUFReader exposes as typed elements; every other type is raw bytes per row.
_ELEMENT_DTYPES: dict[GGMLQuantizationType, np.dtype] = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.F64: np.dtype("<f8"),
    GGMLQuantizationType.I8: np.dtype("<i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"),
    GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGML order: ne0 (the contiguous row length) first
    offset: int  # absolute position of the data in the file
    n_bytes: int
    data: np.ndarray  # read-only view: elements for float/int types, bytes per row for quantized ones

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class GGUFFile:
    """An open GGUF file: ``version``, ``metadata`` (key -> plain value), ``tensors``, ``alignment``,
    ``data_offset``. The file stays memory-mapped while the object (or any tensor view) lives."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.size = os.path.getsize(self.path)
        if self.size < 24:
            raise ValueError(f"truncated: {self.size} bytes, shorter than a GGUF header")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r").view(np.ndarray)  # plain views: cheaper
        self._buf = memoryview(self._map)
        self.size = len(self._map)
        try:
            self._parse()
        except (struct.error, IndexError):
            raise ValueError(f"truncated: the header runs past the end of the file ({self.size} bytes)") from None

    # -- parsing ------------------------------------------------------------------------------------
    def _parse(self) -> None:
        buf = self._buf
        if bytes(buf[:4]) != MAGIC:
            raise ValueError(f"bad magic {bytes(buf[:4])!r}, expected {MAGIC!r}")
        version = _U32.unpack_from(buf, 4)[0]
        if version & 0xFFFF == 0 and version:
            raise ValueError("big-endian GGUF files are not supported")
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"unsupported GGUF version {version} (supported: 2, 3)")
        self.version = version
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        off = 24
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, GGUFValueType] = {}
        for _ in range(self._count(n_kv, off, 12, "metadata keys")):
            key, off = self._string(off)
            vtype = _U32.unpack_from(buf, off)[0]
            if key in self.metadata:
                raise ValueError(f"duplicate metadata key {key!r}")
            self.metadata[key], off = self._value(vtype, off + 4)
            self.value_types[key] = GGUFValueType(vtype)
        infos = []
        for _ in range(self._count(n_tensors, off, 24, "tensors")):
            name, off = self._string(off)
            n_dims = _U32.unpack_from(buf, off)[0]
            if n_dims > MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
            off += 4 + 8 * n_dims
            raw_type, rel = struct.unpack_from("<IQ", buf, off)
            off += 12
            infos.append((name, dims, raw_type, rel))
        self.alignment = self._alignment()
        self.data_offset = -(-off // self.alignment) * self.alignment
        self.tensors = [self._tensor(*info) for info in infos]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError("duplicate tensor names")

    def _count(self, n: int, off: int, min_bytes: int, what: str) -> int:
        if n * min_bytes > self.size - off:
            raise ValueError(f"claims {n} {what}, more than the file ({self.size} bytes) can hold")
        return n

    def _string(self, off: int) -> tuple[str, int]:
        n = _U64.unpack_from(self._buf, off)[0]
        end = off + 8 + n
        if end > self.size:
            raise ValueError(f"truncated: a string at byte {off} runs past the end of the file")
        return str(self._buf[off + 8 : end], "utf-8", "replace"), end

    def _value(self, vtype: int, off: int, depth: int = 0) -> tuple[Any, int]:
        buf = self._buf
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            return scalar[0].unpack_from(buf, off)[0], off + scalar[0].size
        if vtype == GGUFValueType.BOOL:
            return buf[off] != 0, off + 1
        if vtype == GGUFValueType.STRING:
            return self._string(off)
        if vtype != GGUFValueType.ARRAY:
            raise ValueError(f"unknown metadata value type {vtype} at byte {off}")
        itype, n = struct.unpack_from("<IQ", buf, off)
        off += 12
        scalar = _SCALARS.get(itype)
        if scalar is not None or itype == GGUFValueType.BOOL:
            dtype = scalar[1] if scalar is not None else np.dtype("u1")
            end = off + n * dtype.itemsize
            if end > self.size:
                raise ValueError(f"truncated: an array at byte {off} runs past the end of the file")
            arr = np.frombuffer(buf, dtype=dtype, count=n, offset=off)
            return (arr != 0 if scalar is None else arr).tolist(), end
        if itype == GGUFValueType.STRING:
            return self._strings(off, self._count(n, off, 8, "strings"))
        if itype == GGUFValueType.ARRAY:
            if depth >= MAX_NESTING:
                raise ValueError(f"metadata arrays nested more than {MAX_NESTING} deep at byte {off}")
            items = []
            for _ in range(self._count(n, off, 12, "arrays")):
                item, off = self._value(itype, off, depth + 1)
                items.append(item)
            return items, off
        raise ValueError(f"unknown metadata array element type {itype} at byte {off}")

    def _strings(self, off: int, n: int) -> tuple[list[str], int]:
        """``n`` length-prefixed strings from ``off``: copied to ``bytes`` in chunks (slicing bytes is faster
        than slicing the memoryview), then one ``unpack_from`` + ``decode`` per string."""
        out: list[str] = []
        append, unpack = out.append, _U64.unpack_from
        want = max(n * 32, 1 << 16)
        while len(out) < n:
            chunk = bytes(self._buf[off : off + want])
            at_end = off + want >= self.size
            limit, pos = len(chunk), 0
            for _ in range(n - len(out)):
                if pos + 8 > limit:
                    break
                end = pos + 8 + unpack(chunk, pos)[0]
                if end > limit:
                    break
                append(chunk[pos + 8 : end].decode("utf-8", "replace"))
                pos = end
            off += pos
            if len(out) < n and at_end:
                raise ValueError(f"truncated: a string array at byte {off} runs past the end of the file")
            want *= 2
        return out, off

    def _alignment(self) -> int:
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if "general.alignment" in self.metadata and self.value_types["general.alignment"] != GGUFValueType.UINT32:
            raise ValueError("general.alignment is not a uint32")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment {align} is not a power of two")
        return align

    def _tensor(self, name: str, dims: tuple[int, ...], raw_type: int, rel: int) -> GGUFTensorInfo:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ValueError(f"tensor {name!r} has unknown type {raw_type}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        ne0 = dims[0] if dims else 1
        if ne0 % block:
            raise ValueError(f"tensor {name!r}: row length {ne0} is not a multiple of the {qtype.name} block "
                             f"size {block}")
        n_elements = 1
        for d in dims:
            n_elements *= d
        n_bytes = n_elements // block * type_size
        start = self.data_offset + rel
        if start + n_bytes > self.size:
            raise ValueError(f"tensor {name!r} data (bytes {start}..{start + n_bytes}) lies outside the file "
                             f"({self.size} bytes)")
        shape = tuple(reversed(dims))
        dtype = _ELEMENT_DTYPES.get(qtype)
        if dtype is None:  # raw bytes per row, as gguf.quants.quant_shape_to_byte_shape gives them
            dtype, shape = np.dtype(np.uint8), (*shape[:-1], (shape[-1] if shape else 1) // block * type_size)
        data = self._map[start : start + n_bytes].view(dtype).reshape(shape)
        return GGUFTensorInfo(name, qtype, tuple(dims), start, n_bytes, data)
