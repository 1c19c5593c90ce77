"""Every RoPE scaling type against transformers (Llama model, float32 logits within 1e-4, 32 greedy tokens
one-shot / chunked / reused slot), the frozen dynamic-NTK table by hand, and the K-shift with an attention
factor (yarn, longrope)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from family_check import check_greedy, check_logits, prompt, reference
from model_factory import make_llama_dir

import chatcore
from chatcore.checkpoint_config import config_from_hf
from chatcore.errors import ModelFormatError

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: repeatable float sums


HEAD_DIM = 16  # hidden 64 / 4 heads in the factory's model
SHORT = [1.0, 1.02, 1.05, 1.1, 1.2, 1.4, 1.7, 2.0]
LONG = [1.0, 1.3, 1.9, 2.8, 4.0, 6.5, 9.0, 12.0]


def rope(kind: str, **params: object) -> dict[str, object]:
    return {"rope_parameters": {"rope_type": kind, "rope_theta": 10000.0, **params}}


# name: (config overrides, load options, logits prompt length, first greedy prompt length, check diverging)
VARIANTS: dict[str, tuple[dict[str, object], dict[str, object], int, int, bool]] = {
    "default": (rope("default"), {}, 200, 70, True),
    "linear": (rope("linear", factor=4.0), {}, 200, 70, True),
    "llama3": (rope("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64), {}, 200, 70, True),
    # dynamic: transformers recomputes past max_position_embeddings (512); within it both use the plain table
    "dynamic": (rope("dynamic", factor=2.0), {}, 200, 70, True),
    "yarn": (rope("yarn", factor=4.0, original_max_position_embeddings=128), {}, 200, 70, True),
    "yarn-mscale": (rope("yarn", factor=4.0, original_max_position_embeddings=128, mscale=0.8, mscale_all_dim=0.5,
                         beta_fast=16, beta_slow=2, truncate=False), {}, 200, 70, True),
    "yarn-attention-factor": (rope("yarn", factor=2.0, original_max_position_embeddings=128, attention_factor=1.3),
                              {}, 200, 70, True),
    # longrope, window 512 > original 128: long factors; transformers uses them for sequences > 128
    "longrope-long": (rope("longrope", short_factor=SHORT, long_factor=LONG, original_max_position_embeddings=128),
                      {}, 200, 150, False),
    # longrope, window 128 = original: short factors, as transformers for every sequence that fits
    "longrope-short": (rope("longrope", short_factor=SHORT, long_factor=LONG, original_max_position_embeddings=128),
                       {"max_seq_len": 128}, 100, 40, True),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    overrides, load, n_logits, first, diverge = VARIANTS[request.param]
    path = make_llama_dir(tmp_path_factory.mktemp(request.param), seed=5, **overrides)
    return path, reference(path), load, n_logits, first, diverge


def test_logits_match_transformers(saved) -> None:  # noqa: ANN001
    path, ref, load, n_logits, _, _ = saved
    check_logits(chatcore.load(path, device="cpu", dtype="float32", **load), ref, prompt(n_logits, seed=1))


def test_greedy_matches_generate(saved) -> None:  # noqa: ANN001
    path, ref, load, _, first, diverge = saved
    check_greedy(path, ref, first=first, diverge=diverge, **load)


def test_dynamic_table_is_frozen_for_the_serving_window(tmp_path: Path) -> None:
    """Served past max_position_embeddings (512) at 1024 tokens: the NTK base transformers would use at
    length 1024, by hand, for every position; within 512 it is the plain table."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path = make_llama_dir(tmp_path, **rope("dynamic", factor=2.0))
    wide = chatcore.load(path, device="cpu", dtype="float32", max_seq_len=1024)
    assert wide.window == 1024
    base = 10000.0 * ((2.0 * 1024 / 512) - (2.0 - 1)) ** (HEAD_DIM / (HEAD_DIM - 2))
    by_hand = 1.0 / base ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    torch.testing.assert_close(wide.model.rotary.inv_freq, by_hand, rtol=1e-6, atol=0)
    theirs, _ = ROPE_INIT_FUNCTIONS["dynamic"](LlamaConfig.from_pretrained(path), "cpu", seq_len=1024)
    torch.testing.assert_close(wide.model.rotary.inv_freq, theirs, rtol=1e-6, atol=0)
    angle = 1000 * by_hand
    torch.testing.assert_close(wide.model.rotary.cos[1000], angle.cos(), rtol=0, atol=1e-5)
    plain = chatcore.load(path, device="cpu", dtype="float32")
    assert plain.window == 512
    torch.testing.assert_close(plain.model.rotary.inv_freq, 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    # The window stops at factor x max_position_embeddings; a 700-token prompt runs at 1024.
    assert chatcore.load(path, device="cpu", dtype="float32", max_seq_len=4096).window == 1024
    assert wide.logits(prompt(700, seed=3)).isfinite().all()


@pytest.mark.parametrize("name", ["yarn-mscale", "longrope-long"])
def test_k_shift_with_attention_factor(name: str, tmp_path: Path) -> None:
    """After a drop, shifted keys equal keys computed fresh at their new positions (layer 0): the shift
    rotates by plain angles, the attention factor the stored keys carry stays as it was."""
    engine = chatcore.load(make_llama_dir(tmp_path, **VARIANTS[name][0]), device="cpu", dtype="float32")
    assert engine.model.rotary.attention_scaling != 1.0
    ids = prompt(200, seed=9)
    slot = engine.new_slot()
    engine.prefill(ids, slot)
    slot.drop(4, 60)
    fresh = engine.new_slot()
    engine.prefill(ids[:4] + ids[60:], fresh)
    n = fresh.length
    torch.testing.assert_close(slot.k[0, :, :n], fresh.k[0, :, :n], rtol=0, atol=1e-5)


def test_config_forms_and_errors() -> None:
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 4096}
    old = config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    new = config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}})
    assert old == new and new.rope_theta == 5e5
    assert new.rope_scaling.get("original_max_position_embeddings") == 4096
    # longrope without a factor: max_position_embeddings / original (Phi-3 keeps the original at the top level)
    phi = config_from_hf({**base, "original_max_position_embeddings": 1024, "rope_scaling": {
        "type": "longrope", "short_factor": [1.0] * 2, "long_factor": [2.0] * 2}})
    assert phi.rope_scaling.factor == 4.0 and phi.rope_scaling.get("original_max_position_embeddings") == 1024
    assert math.isclose(config_from_hf({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
                        .max_window, 8192)
    with pytest.raises(ModelFormatError, match="supported: default, linear, dynamic, yarn, llama3, longrope"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "su", "factor": 2.0}})
