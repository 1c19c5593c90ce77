"""Model files whose metadata disagrees with their tensors: one ModelFormatError line each, raised before
anything is allocated for the model; a window longer than memory holds is capped with a notice."""

from __future__ import annotations

import json
import math
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from gguf_convert import write_gguf
from model_factory import make_llama_dir

import chatcore
import chatcore.checkpoint as checkpoint
from chatcore.checkpoint import check_special_ids, fit_window, open_checked, window_bytes_per_token
from chatcore.errors import ModelFormatError
from chatcore.sampling import SamplingParams


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama_dir(tmp_path_factory.mktemp("base") / "m")


def _copy(base: Path, dest: Path, **config: object) -> Path:
    dest.mkdir()
    for f in base.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    raw = json.loads((dest / "config.json").read_text(encoding="utf-8"))
    (dest / "config.json").write_text(json.dumps({**raw, **config}), encoding="utf-8")
    return dest


def _fails_fast(path: Path, match: str, opener: Callable[[Path], object] = open_checked) -> str:
    """Opening ``path`` raises one ModelFormatError line matching ``match`` (no hang), having allocated
    under 20 MB of Python memory on the way."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ModelFormatError, match=match) as info:
            opener(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 60   # a hang bound only; what it allocated is the counted property
    assert peak < 20 * 2**20
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_million_layers_fail_before_any_layer_is_listed(base: Path, tmp_path: Path) -> None:
    path = _copy(base, tmp_path / "m", num_hidden_layers=10**6)
    assert "the config says 1000000 layers but the tensors hold 3" in _fails_fast(path, "layers")


@pytest.mark.parametrize(("field", "value", "tensor"), [
    ("vocab_size", 10**9, "model.embed_tokens.weight"),
    ("hidden_size", 64 * 10**4, "model.embed_tokens.weight"),
    ("intermediate_size", 10**8, "model.layers.0.mlp.gate_proj.weight"),
    ("num_key_value_heads", 4, "model.layers.0.self_attn.k_proj.weight"),
])
def test_a_config_wider_than_the_tensors_is_one_line(base: Path, tmp_path: Path, field: str, value: int,
                                                      tensor: str) -> None:
    path = _copy(base, tmp_path / "m", **{field: value})
    message = _fails_fast(path, "does not belong to these weights")
    assert repr(tensor) in message


def test_loading_it_allocates_nothing(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chatcore.load refuses it before the runtime (and so the model, its tables and caches) is made."""
    built: list[int] = []
    monkeypatch.setattr(checkpoint, "make_runtime", lambda *a, **k: built.append(1))
    path = _copy(base, tmp_path / "m", vocab_size=10**9)
    _fails_fast(path, "embed_tokens", lambda p: chatcore.load(p, device="cpu"))
    assert built == []


@pytest.mark.parametrize("theta", ["NaN", "Infinity", "-Infinity", "0"])
def test_a_rope_base_that_is_not_a_positive_number(base: Path, tmp_path: Path, theta: str) -> None:
    path = _copy(base, tmp_path / "m")
    cfg_file = path / "config.json"
    cfg_file.write_text(cfg_file.read_text(encoding="utf-8").replace('"rope_theta": 10000.0', f'"rope_theta": {theta}'),
                        encoding="utf-8")
    assert "rope_theta must be a positive finite number" in _fails_fast(path, "rope_theta")


def test_a_rope_factor_that_is_not_finite(base: Path, tmp_path: Path) -> None:
    scaling = {"rope_type": "linear", "factor": math.inf, "rope_theta": 10000.0}
    path = _copy(base, tmp_path / "m", rope_scaling=scaling, rope_parameters=scaling)
    _fails_fast(path, "RoPE scaling linear")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_an_index_naming_a_file_outside_the_directory(base: Path, tmp_path: Path, shard: str) -> None:
    path = _copy(base, tmp_path / "m")
    (tmp_path / "outside.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": shard}}), encoding="utf-8")
    assert "outside the model directory" in _fails_fast(path, "outside")


def test_an_index_whose_weight_map_is_not_an_object(base: Path, tmp_path: Path) -> None:
    path = _copy(base, tmp_path / "m")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}), encoding="utf-8")
    _fails_fast(path, "malformed")


def test_special_ids_past_the_vocabulary(base: Path, tmp_path: Path) -> None:
    path = _copy(base, tmp_path / "m", bos_token_id=10**6)
    assert "bos_token_id in config.json is id 1000000, outside the model's vocabulary of 320" in _fails_fast(
        path, "does not belong")
    cfg = open_checked(base)[0]
    tok = SimpleNamespace(bos_token_id=1, eos_token_ids=(2, 320))
    with pytest.raises(ModelFormatError, match="the tokenizer's EOS token is id 320, outside"):
        check_special_ids(base, cfg, tok)  # type: ignore[arg-type]


def test_a_tokenizer_shorter_than_the_vocabulary_loads(gguf_file: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, base: Path) -> None:
    """Common (embeddings padded past the tokenizer) and harmless: ids the tokenizer lacks decode to nothing."""
    import gguf_convert

    full = gguf_convert._vocab
    def short(n: int) -> tuple[list[str], list[str]]:
        tokens, merges = full(n)
        kept = set(tokens[:100])
        return tokens[:100], [m for m in merges if all(part in kept for part in m.split(" "))]

    monkeypatch.setattr(gguf_convert, "_vocab", short)
    engine = chatcore.load(gguf_convert.write_gguf(base, tmp_path / "short.gguf"), device="cpu")
    assert engine.config.vocab_size == 320 and engine.tokenizer.vocab_size == 100
    assert engine.tokenizer.decode([150, 319]) == ""
    assert len(list(engine.generate([1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True)))) == 3


# --- GGUF: the same checks, the metadata patched in place ---------------------------------------------------
@pytest.fixture(scope="module")
def gguf_file(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(base, tmp_path_factory.mktemp("gguf") / "m.gguf")


def _patch(src: Path, dest: Path, key: str, fmt: str, value: float) -> Path:
    """``src`` with the scalar metadata value ``key`` (GGUF type uint32 or float32) set to ``value``."""
    data = bytearray(src.read_bytes())
    at = data.index(key.encode()) + len(key)
    kind = struct.unpack_from("<I", data, at)[0]
    assert kind == {"<I": 4, "<f": 6}[fmt]
    struct.pack_into(fmt, data, at + 4, value)
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize(("key", "fmt", "value", "match"), [
    ("llama.block_count", "<I", 10**6, "1000000 layers"),
    ("llama.vocab_size", "<I", 10**9, "token_embd|embed_tokens"),
    ("llama.embedding_length", "<I", 64 * 10**4, "does not belong"),
    ("llama.rope.freq_base", "<f", math.nan, "rope_theta"),
    ("llama.rope.freq_base", "<f", math.inf, "rope_theta"),
])
def test_gguf_metadata_that_disagrees(gguf_file: Path, tmp_path: Path, key: str, fmt: str, value: float,
                                      match: str) -> None:
    _fails_fast(_patch(gguf_file, tmp_path / "m.gguf", key, fmt, value), match)


def test_a_gguf_tokenizer_that_cannot_be_built(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf_convert

    full = gguf_convert._vocab
    monkeypatch.setattr(gguf_convert, "_vocab", lambda n: (full(n)[0], []))   # a gpt2 vocabulary without merges
    _fails_fast(gguf_convert.write_gguf(base, tmp_path / "m.gguf"), "its tokenizer cannot be built")


# --- the window: capped to what memory holds ----------------------------------------------------------------
def test_a_huge_context_length_is_capped_by_memory(gguf_file: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A 10^9-token context length on a machine with 64 MiB free: the window (and the RoPE tables made for
    it) is what 80% of the memory left after the weights holds, with a notice saying how to choose it."""
    path = _patch(gguf_file, tmp_path / "m.gguf", "llama.context_length", "<I", 10**9)
    free = 64 * 2**20
    monkeypatch.setattr(checkpoint, "free_memory", lambda dev: free)
    notices: list[str] = []
    engine = chatcore.load(path, device="cpu", status=notices.append)
    assert engine.config.max_position_embeddings == 10**9
    per_token = window_bytes_per_token(engine.config, torch.float32)
    weights = checkpoint.weight_bytes(engine.config, torch.float32)
    assert engine.window >= 512 and engine.window * per_token <= (free - weights) * 0.8
    assert engine.window > (free - weights) * 0.8 / per_token - 256
    (notice,) = notices
    assert "a 1000000000-token window needs" in notice and f"the window is {engine.window} tokens" in notice
    assert "max_seq_len" in notice and "\n" not in notice
    rotary = engine.model.rotary
    assert rotary.cos.shape[0] == engine.window
    assert len(list(engine.generate([1, 2, 3], SamplingParams(max_new_tokens=2)))) == 2


def test_a_window_that_fits_is_kept(base: Path) -> None:
    cfg = open_checked(base)[0]
    assert fit_window(cfg, torch.device("cpu"), torch.float32, 512, 2**30) == (512, None)
    assert fit_window(cfg, torch.device("cpu"), torch.float32, 512, None) == (512, None)
    # never below 512 tokens (or the model's own window): a small model still loads on a full machine
    assert fit_window(cfg, torch.device("cpu"), torch.float32, 10**6, 0)[0] == 512
    assert fit_window(cfg, torch.device("cpu"), torch.float32, 300, 0) == (300, None)


def test_an_explicit_window_beyond_memory_is_capped_too(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "free_memory", lambda dev: 2**20)
    notices: list[str] = []
    engine = chatcore.load(base, device="cpu", max_seq_len=400, status=notices.append)
    assert engine.window == 400 and notices == []   # under the 512-token floor: kept
