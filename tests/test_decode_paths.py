"""The engine's two decode loops give the same reply, stats and slot: the GPU loop (next step queued on the
sampled token before the host reads it, through the slot's CUDA graph) run on the CPU with a stand-in graph
that does what a captured step does, against the plain eager loop."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import chatcore
from chatcore.engine import Engine
from chatcore.sampling import Sampled, Sampler


class EagerGraph:
    """A captured decode step's contract: write the token's keys/values at the slot's length and return its
    logits, without committing the token (the engine commits it when the step is kept)."""

    def __init__(self, engine: Engine, slot: chatcore.KVCache) -> None:
        self.engine, self.slot = engine, slot
        self.launches = 0

    def launch(self, token: torch.Tensor) -> torch.Tensor:
        self.launches += 1
        with torch.inference_mode():
            return self.engine.model.forward(token.reshape(1), self.slot)


class HostFetch:
    """The pinned-memory token read, on the CPU: the plain token, or the packed logprob report in its place."""

    def start(self, token: torch.Tensor, packed: torch.Tensor | None) -> None:
        self.token, self.packed = int(token.reshape(-1)[0]), None if packed is None else packed.tolist()

    def result(self) -> Sampled:
        return Sampled(self.token, None, None) if self.packed is None else Sampler.unpack(self.packed)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Engine:
    return chatcore.load(tiny_llama_dir, device="cpu", dtype="float32", progress=lambda *_: None)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: Engine, graph: bool, prompt: list[int], params: chatcore.SamplingParams, *, capacity: int | None = None,
        sink_tokens: int | None = None, close_after: int | None = None) -> tuple[list, object, list[int], int]:
    slot = engine.new_slot(capacity)
    stand_in = EagerGraph(engine, slot)
    engine._graph = (lambda s: stand_in) if graph else (lambda s: None)
    engine._fetch = HostFetch()
    try:
        gen = engine.generate(prompt, params, slot=slot, sink_tokens=sink_tokens)
        events = []
        for ev in gen:
            events.append((ev.token_id, ev.text, ev.logprob, ev.finish_reason, ev.top_logprobs))
            if close_after is not None and len(events) == close_after:
                gen.close()
                break
    finally:
        del engine._graph, engine._fetch
    return events, gen.stats, list(slot.tokens), stand_in.launches


def same(a: object, b: object) -> None:
    ea, sa, ta, _ = a
    eb, sb, tb, _ = b
    assert ea == eb and ta == tb
    keep = ("prompt_tokens", "cached_tokens", "prefill_tokens", "generated_tokens", "finish_reason", "discarded_tokens")
    assert {k: getattr(sa, k) for k in keep} == {k: getattr(sb, k) for k in keep}


GREEDY = chatcore.SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("case", ["length", "stop-token", "sampled-logprobs", "one-token", "cancel", "full-window",
                                  "sinks", "top-logprobs", "sampled-top-logprobs"])
def test_graph_loop_equals_eager_loop(engine: Engine, case: str) -> None:
    prompt, params, kw = ids(20, 3), GREEDY, {}
    if case == "stop-token":
        first = run(engine, False, prompt, GREEDY)[0]
        params = dataclasses.replace(GREEDY, stop_token_ids=[first[5][0]])
    elif case == "sampled-logprobs":
        params = dataclasses.replace(GREEDY, temperature=0.9, top_k=40, seed=7, logprobs=True)
    elif case == "top-logprobs":
        params = dataclasses.replace(GREEDY, top_logprobs=4)
    elif case == "sampled-top-logprobs":
        params = dataclasses.replace(GREEDY, temperature=0.9, seed=5, top_logprobs=2, stop_token_ids=[7])
    elif case == "one-token":
        params = dataclasses.replace(GREEDY, max_new_tokens=1)
    elif case == "cancel":
        kw = {"close_after": 4}
    elif case == "full-window":
        kw = {"capacity": 26}
    elif case == "sinks":
        params, kw = dataclasses.replace(GREEDY, max_new_tokens=40), {"capacity": 32, "sink_tokens": 4}
    eager, graph = run(engine, False, prompt, params, **kw), run(engine, True, prompt, params, **kw)
    same(eager, graph)
    assert graph[3] > 0 or case == "one-token"   # the GPU loop ran its steps through the graph
    assert eager[3] == 0
    if case == "stop-token":
        stop = params.stop_token_ids[0]
        assert graph[1].finish_reason == "stop" and graph[0][-1][0] == stop
        assert stop not in [e[0] for e in graph[0][:-1]] and stop not in graph[2][len(prompt):]
    if case == "cancel":
        assert graph[1].finish_reason == "cancelled" and graph[1].generated_tokens == 4
    if case == "full-window":
        assert graph[1].finish_reason == "length" and len(graph[2]) == 26
    if case == "sinks":
        assert graph[1].discarded_tokens > 0 and graph[2][:4] == prompt[:4]


def test_top_logprobs_are_the_reference_forward_topk(engine: Engine) -> None:
    """Every step's top tokens and logprobs are log_softmax(logits).topk of a fresh forward pass over the prompt
    and the reply so far; the chosen token's logprob is its entry there; greedy tokens are those without them."""
    prompt = ids(16, 9)
    plain = run(engine, False, prompt, GREEDY)[0]
    for graph in (False, True):
        events = run(engine, graph, prompt, dataclasses.replace(GREEDY, top_logprobs=5))[0]
        assert [e[0] for e in events] == [e[0] for e in plain]
        tokens = [e[0] for e in events]
        ref = torch.log_softmax(engine.logits(prompt + tokens[:-1])[len(prompt) - 1:], dim=-1)
        for step, (token, _, logprob, _, top) in enumerate(events):
            want_lp, want_ids = ref[step].topk(5)
            assert [t for t, _ in top] == want_ids.tolist()
            assert [lp for _, lp in top] == pytest.approx(want_lp.tolist(), abs=1e-4)
            assert top[0][0] == token and logprob == pytest.approx(top[0][1], abs=1e-6)   # greedy: the top-1
            assert logprob == pytest.approx(float(ref[step, token]), abs=1e-4)
