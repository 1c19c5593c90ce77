"""Every model family against its transformers implementation: float32 logits within 1e-4 and 32 greedy
tokens identical to ``generate`` (one-shot, chunked, reused slot). Random weights, tiny shapes."""

from __future__ import annotations

from pathlib import Path

import model_factory
import pytest
from family_check import check_greedy, check_logits, prompt, reference
from safetensors import safe_open

import chatcore
from chatcore.checkpoint_config import config_from_hf, config_from_hf_file
from chatcore.errors import UnsupportedArchitecture
from chatcore.models import FAMILIES
from chatcore.parallel.random_weights import RandomWeights

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: repeatable float sums


VARIANTS = {  # name: (family, transformers config overrides)
    "mistral-window48": ("mistral", {}),
    "mistral-window16-mha": ("mistral", {"sliding_window": 16, "num_key_value_heads": 4, "head_dim": 32}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied-windows": ("qwen2", {"tie_word_embeddings": True, "use_sliding_window": True, "sliding_window": 24,
                                     "max_window_layers": 1}),
    "qwen3": ("qwen3", {}),
    "qwen3-bias-windows": ("qwen3", {"attention_bias": True, "use_sliding_window": True, "sliding_window": 20,
                                     "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    "bloom-4heads": ("bloom", {"n_head": 4, "hidden_size": 64}),
    "bloom-6heads": ("bloom", {}),
    "bloom-residual-post-norm": ("bloom", {"apply_residual_connection_post_layernorm": True,
                                           "tie_word_embeddings": False}),
    "mpt-6heads": ("mpt", {}),
    "mpt-4heads-clip-scale": ("mpt", {"n_heads": 4, "d_model": 64, "tie_word_embeddings": False,
                                      "attn_config": {"clip_qkv": 0.3, "softmax_scale": 0.2}}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    family, overrides = VARIANTS[request.param]
    maker = getattr(model_factory, f"make_{family}_dir")
    path = maker(tmp_path_factory.mktemp(request.param), seed=3, **overrides)
    return family, path, reference(path)


def test_logits_match_transformers(saved) -> None:  # noqa: ANN001
    family, path, ref = saved
    engine = chatcore.load(path, device="cpu", dtype="float32")
    assert engine.config.family == family
    check_logits(engine, ref, prompt(200, seed=1))


def test_greedy_matches_generate(saved) -> None:  # noqa: ANN001
    _, path, ref = saved
    check_greedy(path, ref, first=70)  # 70 + 32 tokens: past every window above


def test_config_reads_each_family(saved) -> None:  # noqa: ANN001
    family, path, _ = saved
    cfg = config_from_hf_file(path / "config.json")
    if family == "mistral":
        assert cfg.sliding_windows and len(set(cfg.sliding_windows)) == 1
    assert cfg.qkv_bias == (family == "qwen2")
    assert cfg.qk_norm == (family == "qwen3")


def test_qwen_windows_follow_layer_types() -> None:
    base = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 4, "num_attention_heads": 2, "sliding_window": 16}
    assert config_from_hf(base).sliding_windows == ()                      # use_sliding_window off
    on = {**base, "use_sliding_window": True, "max_window_layers": 2}
    assert config_from_hf(on).sliding_windows == (0, 0, 16, 16)
    typed = {**on, "layer_types": ["sliding_attention", "full_attention"] * 2}
    assert config_from_hf(typed).sliding_windows == (16, 0, 16, 0)


def test_unsupported_architecture_names_what_is_supported() -> None:
    with pytest.raises(UnsupportedArchitecture, match="supported: Llama .*Mistral, Qwen2, Qwen3"):
        config_from_hf({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"})


SHAPE_VARIANTS = {  # every family, with the optional tensors its configs can add
    "llama": {"attention_bias": True, "mlp_bias": True}, "mistral": {}, "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"attention_bias": True}, "gemma3": {"attention_bias": True}, "bloom": {"tie_word_embeddings": False},
    "mpt": {}}


@pytest.mark.parametrize("family", sorted(SHAPE_VARIANTS))
def test_declared_shapes_are_the_checkpoints(family: str, tmp_path: Path) -> None:
    """A family's ``shapes`` name every tensor its transformers checkpoint holds, in the checkpoint's shapes;
    random weights (benchmarks) come in those shapes."""
    assert sorted(SHAPE_VARIANTS) == sorted(FAMILIES)
    path = getattr(model_factory, f"make_{family}_dir")(tmp_path, **SHAPE_VARIANTS[family])
    cfg = config_from_hf_file(path / "config.json")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    declared = FAMILIES[cfg.family].shapes(cfg)
    assert declared == {name: saved.get(name) for name in declared}
    assert set(saved) - set(declared) <= {"lm_head.weight"}   # transformers may save a tied head too
    assert FAMILIES[cfg.family].tensor_names(cfg) == list(declared)
    weights = RandomWeights(cfg, seed=0)
    assert weights.names() == set(declared)
    assert all(tuple(weights.get(name).shape) == shape for name, shape in declared.items())
