"""The Llama family against the transformers implementation: logits in float32 and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_check import GREEDY, hf_greedy, our_greedy, prompt, reference
from model_factory import make_llama_dir

import chatcore

VARIANTS = {
    "plain": {},
    "tied-bias": {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
    "mha-headdim": {"num_key_value_heads": 4, "head_dim": 32},
    "rope-linear": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "rope-llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    path = make_llama_dir(tmp_path_factory.mktemp(request.param), seed=3, **VARIANTS[request.param])
    return chatcore.load(path, device="cpu", dtype="float32"), reference(path)


def test_logits_match_transformers(pair) -> None:  # noqa: ANN001
    engine, ref = pair
    ids = prompt(200, seed=1)
    ours = engine.logits(ids)
    with torch.inference_mode():
        theirs = ref(torch.tensor([ids])).logits[0]
    assert ours.shape == theirs.shape == (200, 320)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_matches_generate(pair) -> None:  # noqa: ANN001
    engine, ref = pair
    ids = prompt(37, seed=2)
    assert our_greedy(engine, ids) == hf_greedy(ref, ids)


def test_chunked_prefill_same_tokens(tiny_llama_dir: Path) -> None:
    ref = reference(tiny_llama_dir)
    ids = prompt(150, seed=4)
    one_shot = chatcore.load(tiny_llama_dir, device="cpu", dtype="float32", prefill_chunk=4096)
    chunked = chatcore.load(tiny_llama_dir, device="cpu", dtype="float32", prefill_chunk=16)
    assert (one_shot.logits(ids) - chunked.logits(ids)).abs().max().item() <= 1e-5
    expected = hf_greedy(ref, ids)
    assert our_greedy(one_shot, ids) == expected
    assert our_greedy(chunked, ids) == expected


def test_prefix_reuse_prefills_only_the_rest(tiny_llama_dir: Path) -> None:
    ref = reference(tiny_llama_dir)
    engine = chatcore.load(tiny_llama_dir, device="cpu", dtype="float32", prefill_chunk=8)
    slot = engine.new_slot()
    first = prompt(40, seed=5)
    reply = our_greedy(engine, first, slot=slot)
    assert slot.tokens == first + reply[:-1]          # the last sampled token was never run
    second = first + reply + prompt(12, seed=6)       # the next turn extends the conversation
    events = list(engine.generate(second, GREEDY, slot=slot))
    stats = events[-1].stats
    assert stats is not None and stats.cached_tokens == len(first) + len(reply) - 1
    assert stats.prefill_tokens == len(second) - stats.cached_tokens
    assert [ev.token_id for ev in events] == hf_greedy(ref, second)
    # A prompt that diverges early: the slot is cut back to the shared prefix, the rest recomputed.
    third = first[:10] + prompt(20, seed=7)
    events = list(engine.generate(third, GREEDY, slot=slot))
    assert events[-1].stats.cached_tokens == 10
    assert [ev.token_id for ev in events] == hf_greedy(ref, third)
    # The identical prompt again: everything but the last token comes from the cache.
    events = list(engine.generate(third, GREEDY, slot=slot))
    assert events[-1].stats.cached_tokens == len(third) - 1
    assert [ev.token_id for ev in events] == hf_greedy(ref, third)


def test_sharded_checkpoint_loads_like_a_single_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    ids = prompt(30, seed=8)
    one = chatcore.load(tiny_llama_dir, device="cpu", dtype="float32").logits(ids)
    many = chatcore.load(sharded, device="cpu", dtype="float32").logits(ids)
    assert torch.equal(one, many)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_paired_residual_norms_compute_the_same(tmp_path: Path, family: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Several rows on a GPU take the paired flow (each residual add with the norm after it, as add_rms_norm runs
    them: the next layer's attention norm, the final norm after the last layer). Forced here on the CPU, where
    add_rms_norm is the plain two ops, the logits equal the one-token flow's exactly."""
    from model_factory import make_qwen3_dir

    import chatcore.models.llama as llama_module

    make = make_qwen3_dir if family == "qwen3" else make_llama_dir
    path = make(tmp_path, seed=5)
    engine = chatcore.load(path, device="cpu", dtype="float32")
    ids = prompt(40, seed=6)
    plain = engine.logits(ids)
    seen: list[int] = []

    def fused(x: torch.Tensor) -> bool:
        seen.append(x.shape[0])
        return True

    monkeypatch.setattr(llama_module, "use_fused", fused)
    assert engine.logits(ids).equal(plain)
    assert seen and all(n > 1 for n in seen)   # the paired flow ran
