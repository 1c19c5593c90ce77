"""Shared checks of a saved checkpoint against its transformers model (import: ``from family_check import ...``).

``check_logits``: logits of one long prompt within 1e-4 (float32). ``check_greedy``: 32 greedy tokens equal
transformers ``generate`` one-shot, with chunked prefill (16 tokens a chunk), and in a slot reused across
two turns (the second prefills only its new tokens) and cut back by a diverging prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch

import chatcore
from chatcore import SamplingParams

GREEDY = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)


def reference(path: Path):  # noqa: ANN201
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def prompt(n: int, seed: int, vocab: int = 320) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n,), generator=g).tolist()


def hf_greedy(model, ids: list[int], n: int = 32) -> list[int]:  # noqa: ANN001
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def our_greedy(engine: chatcore.Engine, ids: list[int], slot=None) -> list[int]:  # noqa: ANN001
    return [ev.token_id for ev in engine.generate(ids, GREEDY, slot=slot)]


def check_logits(engine: chatcore.Engine, ref, ids: list[int], tol: float = 1e-4) -> None:  # noqa: ANN001
    ours = engine.logits(ids)
    with torch.inference_mode():
        theirs = ref(torch.tensor([ids])).logits[0]
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= tol, f"max |logit difference| {diff:.3g} > {tol}"


def check_greedy(path: Path, ref, *, first: int = 70, vocab: int = 320, diverge: bool = True,  # noqa: ANN001
                 **load: object) -> None:
    """One-shot, chunked, and slot reuse; ``first`` tokens in the first prompt (make it pass any window).
    ``diverge``: also check a short diverging prompt (30 tokens) in the reused slot."""
    one_shot = chatcore.load(path, device="cpu", dtype="float32", **load)
    chunked = chatcore.load(path, device="cpu", dtype="float32", prefill_chunk=16, **load)
    ids = prompt(first, seed=2, vocab=vocab)
    expected = hf_greedy(ref, ids)
    assert our_greedy(one_shot, ids) == expected, "one-shot greedy differs from transformers"
    assert our_greedy(chunked, ids) == expected, "chunked-prefill greedy differs from transformers"
    slot = chunked.new_slot()
    assert our_greedy(chunked, ids, slot=slot) == expected
    second = ids + expected + prompt(12, seed=6, vocab=vocab)
    events = list(chunked.generate(second, GREEDY, slot=slot))
    assert events[-1].stats.cached_tokens == len(ids) + len(expected) - 1
    assert [ev.token_id for ev in events] == hf_greedy(ref, second), "greedy after slot reuse differs"
    if not diverge:
        return
    third = ids[:10] + prompt(20, seed=7, vocab=vocab)
    events = list(chunked.generate(third, GREEDY, slot=slot))
    assert events[-1].stats.cached_tokens == 10
    assert [ev.token_id for ev in events] == hf_greedy(ref, third), "greedy after a diverging prompt differs"
