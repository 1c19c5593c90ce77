"""GGUF dequantization of every common tensor type, on files written with ``gguf.GGUFWriter`` and read with
our reader: bit-identical to ``gguf.quants.dequantize`` (on ``gguf.GGUFReader``'s view of the same file), and,
where ``gguf.quants.quantize`` exists for the type, close to the float data it was made from."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from chatcore.weights.dequant import dequantize
from chatcore.weights.gguf_reader import GGUFFile

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Worst |dequantized - original| / max|original| for the types gguf can quantize (loose: a sanity bound).
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_0: 0.15, Q.Q4_1: 0.1, Q.Q5_0: 0.08,
             Q.Q5_1: 0.05}


def _can_quantize(qtype: Q) -> bool:
    try:
        gguf.quants.quantize(np.zeros((1, 256), np.float32), qtype)
    except (NotImplementedError, gguf.quants.QuantError, KeyError, TypeError):
        return False
    return True


def _random_blocks(shape: tuple[int, ...], qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Valid-looking packed rows for a type gguf cannot quantize: random bits, with bit 14 of every 16-bit
    word cleared so each float16 scale (all at even offsets) is finite and below 2."""
    block, size = GGML_QUANT_SIZES[qtype]
    words = (*shape[:-1], shape[-1] // block * size // 2)
    raw = rng.integers(0, 2**16, size=words, dtype=np.uint16) & np.uint16(0xBFFF)
    return raw.view(np.uint8)


def _payload(qtype: Q, data: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    if qtype == Q.F32:
        return data, True
    if qtype == Q.F16:
        return data.astype(np.float16), True
    if _can_quantize(qtype):
        return gguf.quants.quantize(data, qtype), True
    return _random_blocks(data.shape, qtype, rng), False


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[np.ndarray, bool]]]:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("quants") / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    originals = {}
    for qtype in TYPES:
        for shape in ((4, 256), (3, 2, 512)):
            name = f"{qtype.name.lower()}.{len(shape)}d"
            data = rng.standard_normal(shape).astype(np.float32)
            payload, quantized = _payload(qtype, data, rng)
            if qtype in (Q.F32, Q.F16):
                w.add_tensor(name, payload)
            else:
                w.add_tensor(name, payload, raw_dtype=qtype)
            originals[name] = (data, quantized)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, originals


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_every_type_matches_gguf_quants(qtype: Q, written) -> None:  # noqa: ANN001
    path, originals = written
    ours = {t.name: t for t in GGUFFile(path).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(path).tensors}
    names = [n for n in originals if n.startswith(qtype.name.lower() + ".")]
    assert len(names) == 2
    for name in names:
        t, r = ours[name], theirs[name]
        assert t.tensor_type == r.tensor_type == qtype
        expected = np.asarray(gguf.quants.dequantize(r.data, r.tensor_type), dtype=np.float32)
        got = dequantize(t.data, t.tensor_type).numpy()
        assert got.shape == expected.shape
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), name  # bit for bit
        assert np.isfinite(got).all()
        data, quantized = originals[name]
        if quantized:
            err = np.abs(got.reshape(data.shape) - data).max() / np.abs(data).max()
            assert err <= TOLERANCE[qtype], f"{name}: relative error {err:.3g}"
