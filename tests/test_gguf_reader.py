"""The fast GGUF reader (chatcore.weights.gguf_reader) and dequantizer (chatcore.weights.dequant).

Reference: ``gguf.GGUFReader`` and ``gguf.quants.dequantize`` from the ``gguf`` package, on the real demo GGUF
and on small files written here with ``gguf.GGUFWriter``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from chatcore.errors import ModelFormatError
from chatcore.loader import open_checkpoint
from chatcore.models.llama import GGUF_NAMES, unpermute_qk
from chatcore.tokenizer.gguf_vocab import metadata_from_reader, read_gguf_metadata
from chatcore.weights.dequant import FAST_TYPES, dequantize
from chatcore.weights.gguf_file import GGUFTensors
from chatcore.weights.gguf_reader import GGUFFile


def reference_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def bits(a: np.ndarray | torch.Tensor) -> np.ndarray:
    """float32 values as their bit patterns, so that equality is bit-identity (NaNs included)."""
    arr = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)


def assert_same_as_reference(path: Path, *, check_data: bool = True) -> None:
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    ref_meta = reference_metadata(ref)
    assert list(ours.metadata) == list(ref_meta)
    for key, value in ref_meta.items():
        assert ours.metadata[key] == value, key
        assert type(ours.metadata[key]) is type(value), key
        if isinstance(value, list) and value:
            assert {type(v) for v in ours.metadata[key]} == {type(v) for v in value}, key
    assert ours.alignment == ref.alignment and ours.data_offset == ref.data_offset
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for t, r in zip(ours.tensors, ref.tensors, strict=True):
        assert t.tensor_type == r.tensor_type, t.name
        assert list(t.shape) == [int(d) for d in r.shape], t.name
        assert t.offset == r.data_offset and t.n_bytes == r.n_bytes and t.n_elements == r.n_elements, t.name
        assert t.data.dtype == r.data.dtype and t.data.shape == r.data.shape, t.name
        if check_data:
            assert np.array_equal(t.data, r.data), t.name
            expected = gguf.quants.dequantize(r.data, r.tensor_type)
            assert np.array_equal(bits(gguf.quants.dequantize(t.data, t.tensor_type)), bits(expected)), t.name
            fast = dequantize(t.data, t.tensor_type)
            assert fast.dtype == torch.float32 and tuple(fast.shape) == expected.shape, t.name
            assert np.array_equal(bits(fast), bits(expected)), t.name


# --- the real demo GGUF ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_gguf_matches_gguf_reader(demo_gguf: Path) -> None:
    assert_same_as_reference(demo_gguf)
    meta = GGUFFile(demo_gguf).metadata
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and len(meta["tokenizer.ggml.merges"]) == 48900
    assert read_gguf_metadata(demo_gguf) == meta


# --- small files written with gguf.GGUFWriter -----------------------------------------------------------

TOKENS = ["<unk>", "a", "b", "ab", " ", "Ġthe", "héllo", "日本", "😀", "", "x" * 300]


def write_small(path: Path, *, alignment: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -32000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float32("t.f32", 0.1)
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.str", "héllo wörld 😀")
    w.add_array("t.strings", TOKENS)
    w.add_array("t.ints", [3, -1, 2**31 - 1])
    w.add_array("t.floats", [0.5, -1e-5, 3.25])
    w.add_array("t.bools", [True, False, True])
    w.add_key_value("t.u8s", [0, 7, 255], V.ARRAY, sub_type=V.UINT8)
    w.add_key_value("t.i64s", [-(2**40), 0, 2**40], V.ARRAY, sub_type=V.INT64)
    w.add_key_value("t.f64s", [0.1, -2.5], V.ARRAY, sub_type=V.FLOAT64)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f32.vec", rng.standard_normal(7).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 2, 6)).astype(np.float16))
    for qtype, shape in ((Q.Q8_0, (6, 64)), (Q.Q4_0, (8, 96)), (Q.Q4_1, (4, 32)), (Q.BF16, (3, 10))):
        data = rng.standard_normal(shape).astype(np.float32)
        w.add_tensor(f"{qtype.name.lower()}", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def small(tmp_path: Path) -> Path:
    return write_small(tmp_path / "small.gguf")


def test_small_file_matches_gguf_reader(small: Path) -> None:
    assert_same_as_reference(small)
    meta = GGUFFile(small).metadata
    assert meta["t.strings"] == TOKENS and meta["t.u64"] == 2**63 + 5 and meta["t.bools"] == [True, False, True]
    assert meta["t.f32"] == float(np.float32(0.1)) and meta["t.f64"] == 1e-300
    assert {t.tensor_type for t in GGUFFile(small).tensors} == {Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.BF16}


def test_custom_alignment(tmp_path: Path) -> None:
    path = write_small(tmp_path / "aligned.gguf", alignment=256)
    f = GGUFFile(path)
    assert f.alignment == 256 and f.data_offset % 256 == 0 and all(t.offset % 256 == 0 for t in f.tensors)
    assert_same_as_reference(path)


def test_version_2(small: Path) -> None:
    raw = bytearray(small.read_bytes())
    raw[4:8] = struct.pack("<I", 2)  # v2 differs from v3 only for big-endian files
    small.write_bytes(bytes(raw))
    assert GGUFFile(small).version == 2
    assert_same_as_reference(small)


def test_metadata_helpers_accept_both_readers(small: Path) -> None:
    expected = reference_metadata(gguf.GGUFReader(small))
    assert read_gguf_metadata(small) == expected
    assert read_gguf_metadata(str(small)) == expected
    assert metadata_from_reader(GGUFFile(small)) == expected
    assert metadata_from_reader(gguf.GGUFReader(small)) == expected


def test_nested_arrays_and_invalid_utf8(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "llama")
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_key_value("t.bad", b"ok\xffok", V.STRING)
    w.add_key_value("t.bad_list", [b"\xc3", b"fine"], V.ARRAY, sub_type=V.STRING)
    w.add_tensor("x", np.zeros(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = GGUFFile(tmp_path / "odd.gguf").metadata
    assert meta["t.nested"] == [[1, 2], [3]]
    assert meta["t.bad"] == "ok\ufffdok" and meta["t.bad_list"] == ["\ufffd", "fine"]


def test_gguf_tensors_same_with_either_reader(tmp_path: Path) -> None:
    """GGUFTensors under HF names, q/k un-permuted (on the packed rows): equal to dequantizing with gguf.quants
    and un-permuting the floats, with either reader."""
    rng = np.random.default_rng(3)
    heads, kv_heads, dim = 4, 2, 64
    tensors = {
        "token_embd.weight": (Q.Q8_0, (32, dim)),
        "output_norm.weight": (Q.F32, (dim,)),
        "blk.0.attn_q.weight": (Q.Q4_1, (dim, dim)),
        "blk.0.attn_k.weight": (Q.Q4_0, (kv_heads * 16, dim)),
        "blk.0.attn_v.weight": (Q.F16, (kv_heads * 16, dim)),
    }
    w = gguf.GGUFWriter(str(tmp_path / "named.gguf"), "llama")
    for name, (qtype, shape) in tensors.items():
        data = rng.standard_normal(shape).astype(np.float32)
        if qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        elif qtype == Q.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path = tmp_path / "named.gguf"
    ours = GGUFTensors(GGUFFile(path), path, heads, kv_heads, GGUF_NAMES)
    theirs = GGUFTensors(gguf.GGUFReader(path), path, heads, kv_heads, GGUF_NAMES)
    ref = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert ours.names() == theirs.names() and len(ours.names()) == len(tensors) and not ours.unknown
    for gguf_name in tensors:
        hf = GGUF_NAMES.hf_name(gguf_name)
        assert hf is not None
        t = ref[gguf_name]
        expected = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        if ".attn_q." in gguf_name or ".attn_k." in gguf_name:
            expected = unpermute_qk(expected, heads if ".attn_q." in gguf_name else kv_heads)
        got = ours.get(hf)
        assert got.shape == expected.shape and np.array_equal(bits(got), bits(expected)), hf
        assert np.array_equal(bits(theirs.get(hf)), bits(expected)), hf


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.F32])
def test_unpermute_before_dequantizing_is_exact(qtype: Q) -> None:
    rows, cols, heads = 48, 64, 3
    data = gguf.quants.quantize(np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32), qtype)
    after = unpermute_qk(dequantize(data, qtype), heads)
    before = dequantize(unpermute_qk(data, heads), qtype)
    assert np.array_equal(bits(after), bits(before))


# --- malformed files -------------------------------------------------------------------------------------


def one_line_error(path: Path) -> str:
    with pytest.raises(ValueError) as info:
        GGUFFile(path)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_bad_magic(small: Path) -> None:
    small.write_bytes(b"GGUX" + small.read_bytes()[4:])
    assert "magic" in one_line_error(small)


def test_unsupported_version(small: Path) -> None:
    raw = bytearray(small.read_bytes())
    for version, word in ((1, "version 1"), (4, "version 4"), (3 << 24, "big-endian")):
        raw[4:8] = struct.pack("<I", version)
        small.write_bytes(bytes(raw))
        assert word in one_line_error(small)


def test_truncated_anywhere(small: Path) -> None:
    raw = small.read_bytes()
    f = GGUFFile(small)
    strings_at = raw.find(TOKENS[-1].encode())  # inside the string array
    data_end = max(t.offset + t.n_bytes for t in f.tensors)  # the writer pads after the last tensor
    cuts = [0, 3, 20, 30, strings_at, strings_at + 100, f.data_offset - 40, f.data_offset + 10, data_end - 1]
    for cut in cuts:
        small.write_bytes(raw[:cut])
        message = one_line_error(small)
        assert any(word in message for word in ("truncated", "outside the file", "claims")), (cut, message)


def test_counts_and_offsets_out_of_range(small: Path) -> None:
    raw = small.read_bytes()
    small.write_bytes(raw[:16] + struct.pack("<Q", 2**60) + raw[24:])  # metadata count
    assert "claims" in one_line_error(small)
    name = b"q4_0"
    at = raw.find(struct.pack("<Q", len(name)) + name) + 8 + len(name)  # -> n_dims, dims, type, offset
    n_dims = struct.unpack_from("<I", raw, at)[0]
    offset_at = at + 4 + 8 * n_dims + 4
    small.write_bytes(raw[:offset_at] + struct.pack("<Q", 2**40) + raw[offset_at + 8:])
    assert "outside the file" in one_line_error(small)
    type_at = at + 4 + 8 * n_dims
    small.write_bytes(raw[:type_at] + struct.pack("<I", 99) + raw[type_at + 4:])
    assert "unknown type" in one_line_error(small)


def test_corrupt_headers_fail_cleanly(small: Path) -> None:
    """Random byte flips in the header and metadata: the file either still parses or raises ValueError."""
    raw = small.read_bytes()
    end = GGUFFile(small).data_offset
    rng = np.random.default_rng(4)
    for _ in range(300):
        bad = bytearray(raw)
        for at in rng.integers(4, end, size=int(rng.integers(1, 4))):
            bad[at] = int(rng.integers(0, 256))
        small.write_bytes(bytes(bad))
        try:
            GGUFFile(small)
        except ValueError as exc:
            assert str(exc) and "\n" not in str(exc)


def test_loader_reports_a_broken_gguf(small: Path) -> None:
    small.write_bytes(small.read_bytes()[:1000])
    with pytest.raises(ModelFormatError, match=r"is not a readable GGUF file \(.*\); re-download it") as info:
        open_checkpoint(small)
    assert "\n" not in str(info.value)


# --- dequantization: bit-identical to gguf.quants -------------------------------------------------------


def random_blocks(qtype: Q, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random packed data shaped as gguf.GGUFReader shapes it: random quant bytes, finite float16 scales
    (normal, subnormal, zero, negative) so that every value is an ordinary float."""
    rng = np.random.default_rng(seed)
    if qtype in (Q.F32, Q.F16):
        return rng.standard_normal(shape).astype(np.float32 if qtype == Q.F32 else np.float16)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    header = {Q.Q4_0: 2, Q.Q4_1: 4, Q.Q8_0: 2}.get(qtype, 0)
    if header:
        scales = (rng.standard_normal((n_blocks, header // 2)) * rng.choice([1e-6, 1e-3, 1.0, 0.0], (n_blocks, 1)))
        raw[:, :header] = scales.astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:  # the top halves of float32 values
        raw = rng.standard_normal(n_blocks).astype(np.float32).view(np.uint16)[1::2].copy().view(np.uint8)
    return raw.reshape(*shape[:-1], shape[-1] // block * type_size)


@pytest.mark.parametrize("qtype", sorted(FAST_TYPES, key=lambda q: q.name))
@pytest.mark.parametrize("shape", [(32,), (3, 64), (2, 37, 2048)])  # the last one spans several chunks
def test_dequantize_bit_exact(qtype: Q, shape: tuple[int, ...]) -> None:
    data = random_blocks(qtype, shape, seed=len(shape))
    expected = gguf.quants.dequantize(data, qtype)
    got = dequantize(data, qtype)
    assert got.dtype == torch.float32 and tuple(got.shape) == shape == expected.shape
    assert np.array_equal(bits(got), bits(expected))
    assert got.numpy().flags.writeable and not np.shares_memory(got.numpy(), data)
    assert np.array_equal(bits(dequantize(torch.from_numpy(data.copy()), qtype)), bits(expected))


def test_dequantize_other_types_fall_back_to_gguf() -> None:
    data = gguf.quants.quantize(np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32), Q.Q5_0)
    assert Q.Q5_0 not in FAST_TYPES
    got = dequantize(data, Q.Q5_0)
    assert got.numpy().flags.writeable
    assert np.array_equal(bits(got), bits(gguf.quants.dequantize(data, Q.Q5_0)))
