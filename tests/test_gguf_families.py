"""GGUF files of every family, written as llama.cpp's converter writes them (tests/gguf_convert.py), against
transformers on the checkpoint they were converted from: float32 logits within 1e-4 and 32 greedy tokens
identical to ``generate`` (one-shot, chunked, reused slot). Also: configs read from GGUF metadata equal those
read from config.json, ``chatcore convert`` gives back a directory transformers loads, the test writer agrees
with transformers' own GGUF reader, and unsupported files fail with one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import model_factory
import numpy as np
import pytest
import torch
from family_check import check_greedy, check_logits, prompt, reference
from gguf_convert import write_gguf
from safetensors.torch import load_file

import chatcore
from chatcore.checkpoint_config import config_from_gguf, config_from_hf_file
from chatcore.config_gguf import llama3_factors, llama3_scaling
from chatcore.convert import gguf_to_hf_dir
from chatcore.errors import ModelFormatError, UnsupportedArchitecture
from chatcore.loader import open_checkpoint
from chatcore.models.bloom import qkv_to_per_head
from chatcore.weights.dequant import dequantize

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: repeatable float sums


def rope(kind: str, **params: object) -> dict[str, object]:
    return {"rope_parameters": {"rope_type": kind, "rope_theta": 10000.0, **params}}


VARIANTS = {  # name: (family, transformers config overrides)
    "llama": ("llama", {}),
    "llama-mha-linear-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True,
                                        **rope("linear", factor=2.0)}),
    # Llama 3.1-style scaling, stored as rope_freqs (2 of the 8 frequencies in the smooth band)
    "llama-llama3-rope-freqs": ("llama", rope("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position_embeddings=64)),
    "mistral": ("mistral", {"sliding_window": None}),  # GGUF keeps no window (below)
    "qwen2": ("qwen2", {}),
    "qwen2-tied-yarn": ("qwen2", {"tie_word_embeddings": True, **rope("yarn", factor=4.0,
                                                                       original_max_position_embeddings=128)}),
    "qwen3": ("qwen3", {}),
    # llama.cpp's Gemma 3 assumptions: every 6th layer full, query_pre_attn_scalar = head_dim, local base 10,000
    "gemma3-softcap": ("gemma3", {"num_hidden_layers": 6, "layer_types": None, "query_pre_attn_scalar": 24,
                                  "final_logit_softcapping": 30.0}),
    "bloom-4heads": ("bloom", {"n_head": 4, "hidden_size": 64, "seq_length": 512}),
    "bloom-6heads-untied": ("bloom", {"seq_length": 512, "tie_word_embeddings": False}),
    "mpt-6heads": ("mpt", {}),
    "mpt-4heads-clip-untied": ("mpt", {"n_heads": 4, "d_model": 64, "tie_word_embeddings": False,
                                       "attn_config": {"clip_qkv": 0.3}}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    family, overrides = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = getattr(model_factory, f"make_{family}_dir")(root / "hf", seed=5, **overrides)
    return family, hf_dir, write_gguf(hf_dir, root / "model.gguf"), reference(hf_dir)


def test_gguf_logits_match_transformers(converted) -> None:  # noqa: ANN001
    family, _, path, ref = converted
    engine = chatcore.load(path, device="cpu", dtype="float32")
    assert engine.config.family == ("llama" if family == "mistral" else family)
    check_logits(engine, ref, prompt(200, seed=1))


def test_gguf_greedy_matches_generate(converted) -> None:  # noqa: ANN001
    _, _, path, ref = converted
    check_greedy(path, ref, first=70)


def test_gguf_config_equals_config_json(converted) -> None:  # noqa: ANN001
    """What the GGUF's metadata and tensors say equals config.json, but for what GGUF does not record."""
    family, hf_dir, path, _ = converted
    ours, _, _ = open_checkpoint(path)
    theirs = config_from_hf_file(hf_dir / "config.json")
    if family == "mistral":
        theirs = dataclasses.replace(theirs, family="llama")
    if family == "bloom":  # the converter always writes the tied head out as output.weight
        theirs = dataclasses.replace(theirs, tie_word_embeddings=False)
    as_f32 = {k: float(np.float32(getattr(theirs, k))) for k in ("rms_norm_eps", "rope_theta", "clip_qkv")
              if getattr(theirs, k) is not None}  # GGUF stores these as float32
    assert dataclasses.replace(ours, eos_token_ids=()) == dataclasses.replace(theirs, eos_token_ids=(), **as_f32)


def test_convert_gives_a_directory_transformers_loads(converted, tmp_path: Path) -> None:  # noqa: ANN001
    _, _, path, ref = converted
    out = gguf_to_hf_dir(path, tmp_path / "out")
    ids = prompt(100, seed=4)
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
        got = reference(out)(torch.tensor([ids])).logits[0]
    assert (got - expected).abs().max().item() <= 1e-4
    check_logits(chatcore.load(out, device="cpu", dtype="float32"), ref, ids)


@pytest.mark.parametrize("family", ["llama", "qwen2", "bloom"])
def test_test_writer_agrees_with_transformers_gguf_reader(family: str, tmp_path: Path) -> None:
    """transformers reads GGUF files of these families itself; it gets the checkpoint back from our writer."""
    from transformers import AutoModelForCausalLM

    extra = {"seq_length": 512} if family == "bloom" else {}
    hf_dir = getattr(model_factory, f"make_{family}_dir")(tmp_path / "hf", seed=6, **extra)
    write_gguf(hf_dir, tmp_path / "m.gguf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = prompt(64, seed=3)
    with torch.inference_mode():
        diff = (theirs(torch.tensor([ids])).logits - reference(hf_dir)(torch.tensor([ids])).logits).abs().max()
    assert diff.item() <= 1e-5


def test_mistral_window_is_not_in_gguf(tmp_path: Path) -> None:
    """llama.cpp writes Mistral as architecture llama without its window, and runs it with full attention."""
    hf_dir = model_factory.make_mistral_dir(tmp_path / "hf", sliding_window=48)
    cfg, _, _ = open_checkpoint(write_gguf(hf_dir, tmp_path / "m.gguf"))
    assert cfg.family == "llama" and cfg.sliding_windows == ()
    assert config_from_hf_file(hf_dir / "config.json").sliding_windows == (48,) * 3


def test_quantized_bloom_qkv_regrouped_on_packed_rows(tmp_path: Path) -> None:
    """The q | k | v -> per-head regrouping moves packed Q8_0 rows; equal to regrouping the dequantized rows."""
    hf_dir = model_factory.make_bloom_dir(tmp_path / "hf", seed=2, seq_length=512, hidden_size=64, n_head=4)
    path = write_gguf(hf_dir, tmp_path / "q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    _, source, _ = open_checkpoint(path)
    raw = {t.name: t for t in gguf.GGUFReader(path).tensors}["blk.1.attn_qkv.weight"]
    floats = torch.from_numpy(np.array(gguf.quants.dequantize(raw.data, raw.tensor_type), dtype=np.float32))
    got = source.get("transformer.h.1.self_attention.query_key_value.weight")
    assert torch.equal(got, qkv_to_per_head(floats, 4))
    assert torch.equal(qkv_to_per_head(dequantize(raw.data, raw.tensor_type), 4), got)
    # Q8_0 keeps it close to the checkpoint: the regrouping put the rows back where they came from
    exact = load_file(str(hf_dir / "model.safetensors"))["transformer.h.1.self_attention.query_key_value.weight"]
    assert (got - exact).abs().max().item() < 0.01


@pytest.mark.parametrize(("factor", "high", "old"), [(8.0, 4.0, 8192), (32.0, 4.0, 8192), (8.0, 2.0, 4096)])
def test_llama3_scaling_recovered_from_rope_freqs(factor: float, high: float, old: int) -> None:
    """Llama 3.1 (factor 8) and 3.2 (factor 32) shapes, head_dim 128, base 500,000; the divisors as float32."""
    divisors = np.array(llama3_factors(500_000.0, 128, factor, 1.0, high, old), dtype=np.float32).tolist()
    assert llama3_scaling(divisors, 500_000.0, 128) == (factor, (("high_freq_factor", high), ("low_freq_factor", 1.0),
                                                                 ("original_max_position_embeddings", old)))


def test_rope_freqs_off_llama3s_rule_are_refused() -> None:
    divisors = llama3_factors(500_000.0, 128, 8.0, 1.0, 4.0, 8192)
    divisors[40] *= 1.5
    with pytest.raises(ModelFormatError, match="do not follow Llama 3's RoPE scaling rule"):
        llama3_scaling(divisors, 500_000.0, 128)
    with pytest.raises(ModelFormatError, match="do not follow"):
        llama3_scaling([1.0] * 64, 500_000.0, 128)


def _write(path: Path, arch: str, values: dict[str, object]) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in values.items():
        if isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, int(value))  # type: ignore[call-overload]
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_unknown_gguf_architecture_names_what_is_supported(tmp_path: Path) -> None:
    path = _write(tmp_path / "falcon.gguf", "falcon", {"falcon.block_count": 1})
    with pytest.raises(UnsupportedArchitecture) as info:
        chatcore.load(path, device="cpu")
    message = _one_line(info)
    assert "'falcon' is not supported" in message
    assert "llama, qwen2, qwen3, gemma3, bloom, mpt" in message


def test_mpt_gguf_without_alibi_or_with_fewer_kv_heads_is_refused(tmp_path: Path) -> None:
    base = {"mpt.block_count": 1, "mpt.embedding_length": 8, "mpt.attention.head_count": 2}
    with pytest.raises(UnsupportedArchitecture, match="without ALiBi") as info:
        open_checkpoint(_write(tmp_path / "a.gguf", "mpt", {**base, "mpt.attention.max_alibi_bias": 0.0}))
    _one_line(info)
    with pytest.raises(UnsupportedArchitecture, match="1 KV heads for 2 heads") as info:
        open_checkpoint(_write(tmp_path / "b.gguf", "mpt", {**base, "mpt.attention.head_count_kv": 1}))
    _one_line(info)


def test_gguf_missing_a_key_or_unknown_scaling_fails_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="lacks 'qwen2.embedding_length'") as info:
        open_checkpoint(_write(tmp_path / "a.gguf", "qwen2", {"qwen2.block_count": 1}))
    _one_line(info)
    meta = {"general.architecture": "qwen2", "qwen2.embedding_length": 8, "qwen2.attention.head_count": 2,
            "qwen2.block_count": 1, "qwen2.feed_forward_length": 8, "qwen2.rope.scaling.type": "longrope",
            "qwen2.rope.scaling.factor": 2.0, "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(ModelFormatError, match="GGUF RoPE scaling 'longrope' is not supported"):
        config_from_gguf(meta)
