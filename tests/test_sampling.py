"""Sampling: every filter against distributions worked out by hand, seeds, draws vs probs."""

from __future__ import annotations

import math

import pytest
import torch

from chatcore.sampling import Sampler, SamplingParams

INF = math.inf
# A 6-token vocabulary with chosen logits. Plain softmax, by hand:
# exp = [7.3891, 2.7183, 1.6487, 1.0, 0.3679, 0.0498], sum 13.1737
# p   = [0.5609, 0.2063, 0.1252, 0.0759, 0.0279, 0.0038]
LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0]


def softmax(xs: list[float]) -> list[float]:
    """Plain-Python softmax; -inf entries get probability 0."""
    m = max(xs)
    exps = [math.exp(x - m) if x != -INF else 0.0 for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def run_probs(params: SamplingParams, logits: list[float] = LOGITS, prompt=(), generated=()) -> list[float]:
    s = Sampler(params, len(logits))
    s.start(list(prompt))
    for t in generated:
        s.accept(t)
    out = s.probs(torch.tensor(logits))
    assert out.dtype == torch.float32
    assert math.isclose(float(out.sum()), 1.0, abs_tol=1e-5)
    return out.tolist()


def assert_close(actual: list[float], expected: list[float], tol: float = 1e-5) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a == pytest.approx(e, abs=tol), (actual, expected)


def test_plain_distribution_is_the_hand_softmax() -> None:
    """Temperature 1 and no filter: the sampler's distribution is the softmax worked out in the comment (which
    the softmax helper, the reference of the tests below, reproduces too)."""
    hand = [0.5609, 0.2063, 0.1252, 0.0759, 0.0279, 0.0038]
    assert_close(run_probs(SamplingParams(temperature=1.0)), hand, tol=1e-4)
    assert_close(softmax(LOGITS), hand, tol=1e-4)


# -- greedy --------------------------------------------------------------------------------


def test_greedy_is_one_hot_at_argmax() -> None:
    params = SamplingParams(temperature=0.0)
    assert run_probs(params) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert Sampler(params, 6).sample(torch.tensor(LOGITS)) == (0, None, None)


def test_greedy_uses_the_penalised_logits() -> None:
    # Token 0 is in the prompt: 2.0 / 1.2 = 1.667 < 1.9, so token 1 wins.
    logits = [2.0, 1.9, 0.0, 0.0, 0.0, 0.0]
    s = Sampler(SamplingParams(repetition_penalty=1.2), 6)
    s.start([0])
    assert s.sample(torch.tensor(logits))[0] == 1
    assert s.probs(torch.tensor(logits)).tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]


# -- each filter on its own --------------------------------------------------------------------


def test_temperature() -> None:
    # T = 0.5 doubles the logits: softmax([4, 2, 1, 0, -2, -6])
    assert_close(run_probs(SamplingParams(temperature=0.5)), softmax([4.0, 2.0, 1.0, 0.0, -2.0, -6.0]))
    # T = 1 is the plain softmax
    assert_close(run_probs(SamplingParams(temperature=1.0)), softmax(LOGITS))


def test_top_k() -> None:
    # keep the 3 largest: exp = [7.3891, 2.7183, 1.6487], sum 11.7561
    expected = [7.3891 / 11.7561, 2.7183 / 11.7561, 1.6487 / 11.7561, 0.0, 0.0, 0.0]
    assert_close(run_probs(SamplingParams(temperature=1.0, top_k=3)), expected, tol=1e-4)


def test_top_k_one_and_larger_than_vocab() -> None:
    assert_close(run_probs(SamplingParams(temperature=1.0, top_k=1)), [1.0, 0, 0, 0, 0, 0])
    assert_close(run_probs(SamplingParams(temperature=1.0, top_k=6)), softmax(LOGITS))
    assert_close(run_probs(SamplingParams(temperature=1.0, top_k=1000)), softmax(LOGITS))


def test_top_p() -> None:
    # sorted p = 0.5609, 0.2063, 0.1252, ...; top-2 mass 0.7672 < 0.8 <= top-3 mass 0.8924: keep 3
    p = softmax(LOGITS)
    assert p[0] + p[1] < 0.8 <= p[0] + p[1] + p[2]
    expected = softmax([2.0, 1.0, 0.5, -INF, -INF, -INF])
    assert_close(run_probs(SamplingParams(temperature=1.0, top_p=0.8)), expected)


def test_top_p_keeps_at_least_the_top_token() -> None:
    # top token alone (0.5609) already covers 0.5: only it survives
    assert_close(run_probs(SamplingParams(temperature=1.0, top_p=0.5)), [1.0, 0, 0, 0, 0, 0])
    # a tiny top_p would remove everything: the top token is always kept
    assert_close(run_probs(SamplingParams(temperature=1.0, top_p=1e-9)), [1.0, 0, 0, 0, 0, 0])


def test_min_p() -> None:
    # threshold 0.2 * 0.5609 = 0.1122: tokens 0, 1, 2 (0.1252) stay, token 3 (0.0759) goes
    expected = softmax([2.0, 1.0, 0.5, -INF, -INF, -INF])
    assert_close(run_probs(SamplingParams(temperature=1.0, min_p=0.2)), expected)
    # min_p = 1 keeps only the most likely token
    assert_close(run_probs(SamplingParams(temperature=1.0, min_p=1.0)), [1.0, 0, 0, 0, 0, 0])


def test_min_p_applies_after_temperature() -> None:
    # T = 2: scaled [1, .5, .25, 0, -.5, -1.5]; exp = [2.7183, 1.6487, 1.2840, 1, 0.6065, 0.2231]
    # sum 7.4806, p = [0.3634, 0.2204, 0.1716, 0.1337, 0.0811, 0.0298]
    # threshold 0.2 * 0.3634 = 0.0727: only token 5 goes (at T = 1 three tokens would go)
    expected = softmax([1.0, 0.5, 0.25, 0.0, -0.5, -INF])
    assert_close(run_probs(SamplingParams(temperature=2.0, min_p=0.2)), expected)


def test_repetition_penalty_on_prompt_and_generated() -> None:
    # penalty 2: prompt token 0 (2.0 -> 1.0) and 4 (-1.0 -> -2.0, negative: multiplied),
    # generated token 2 (0.5 -> 0.25); others untouched
    params = SamplingParams(temperature=1.0, repetition_penalty=2.0)
    expected = softmax([1.0, 1.0, 0.25, 0.0, -2.0, -3.0])
    assert_close(run_probs(params, prompt=[0, 4], generated=[2]), expected)
    # penalty < 1 encourages repeats: 2.0 / 0.5 = 4.0
    params = SamplingParams(temperature=1.0, repetition_penalty=0.5)
    assert_close(run_probs(params, prompt=[0]), softmax([4.0, 1.0, 0.5, 0.0, -1.0, -3.0]))


def test_presence_and_frequency_penalties_count_generated_tokens_only() -> None:
    # prompt token 0 is not penalised; generated 1, 1, 2:
    # token 1: 1.0 - 0.5 (presence) - 2 * 0.25 (frequency) = 0.0
    # token 2: 0.5 - 0.5 - 1 * 0.25 = -0.25
    params = SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.25)
    expected = softmax([2.0, 0.0, -0.25, 0.0, -1.0, -3.0])
    assert_close(run_probs(params, prompt=[0], generated=[1, 1, 2]), expected)


def test_start_resets_penalty_state() -> None:
    params = SamplingParams(temperature=1.0, repetition_penalty=2.0, frequency_penalty=1.0)
    s = Sampler(params, 6)
    s.start([0, 1])
    s.accept(2)
    s.accept(2)
    assert not math.isclose(s.probs(torch.tensor(LOGITS))[0].item(), softmax(LOGITS)[0])
    s.start([])
    assert_close(s.probs(torch.tensor(LOGITS)).tolist(), softmax(LOGITS))


def test_combined_filters_in_hf_order() -> None:
    params = SamplingParams(
        temperature=0.5, top_k=4, top_p=0.9, min_p=0.6, repetition_penalty=1.5, presence_penalty=0.5
    )
    # prompt [1], generated [0]
    # repetition (seen 0, 1): 2/1.5 = 1.3333, 1/1.5 = 0.6667; presence (generated 0): 1.3333-0.5
    x = [2.0 / 1.5 - 0.5, 1.0 / 1.5, 0.5, 0.0, -1.0, -3.0]
    x = [v / 0.5 for v in x]  # temperature: [1.6667, 1.3333, 1.0, 0.0, -2.0, -6.0]
    x = x[:4] + [-INF, -INF]  # top-4
    p = softmax(x)  # [0.4134, 0.2962, 0.2123, 0.0781, 0, 0]
    assert p[3] <= 1 - 0.9 < p[3] + p[2]  # top-p drops token 3 only
    x[3] = -INF
    p = softmax(x)  # [0.4484, 0.3213, 0.2302, 0, 0, 0]
    assert p[2] < 0.6 * p[0] <= p[1]  # min-p drops token 2 only
    x[2] = -INF
    expected = softmax(x)  # [0.5826, 0.4174, 0, 0, 0, 0]
    assert_close(expected, [0.5826, 0.4174, 0, 0, 0, 0], tol=1e-4)
    assert_close(run_probs(params, prompt=[1], generated=[0]), expected)


def test_all_minus_inf_but_one() -> None:
    logits = [-INF, -INF, 3.0, -INF, -INF, -INF]
    params = SamplingParams(
        temperature=0.7, top_k=3, top_p=0.5, min_p=0.3, repetition_penalty=1.3, frequency_penalty=0.4
    )
    assert run_probs(params, logits, prompt=[2, 0], generated=[2]) == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    for seed in range(20):
        s = Sampler(params.replace(seed=seed, logprobs=True), 6)
        s.start([2])
        assert s.sample(torch.tensor(logits)) == (2, 0.0, None)


# -- input handling ----------------------------------------------------------------------------


def test_bf16_logits_are_upcast_and_not_modified() -> None:
    params = SamplingParams(temperature=0.8, repetition_penalty=1.3, presence_penalty=0.3)
    s = Sampler(params, 6)
    s.start([0])
    s.accept(1)
    bf16 = torch.tensor(LOGITS, dtype=torch.bfloat16)
    f32 = torch.tensor(LOGITS, dtype=torch.float32)
    out = s.probs(bf16)
    assert out.dtype == torch.float32
    assert torch.allclose(out, s.probs(f32))  # these logits are exact in bf16
    assert f32.tolist() == LOGITS  # processing never writes into the caller's tensor


def test_bad_inputs_raise() -> None:
    s = Sampler(SamplingParams(repetition_penalty=1.1), 6)
    with pytest.raises(ValueError, match="logits"):
        s.probs(torch.zeros(7))
    with pytest.raises(ValueError, match="logits"):
        s.sample(torch.zeros(1, 6))
    with pytest.raises(ValueError, match="token id"):
        s.accept(6)
    with pytest.raises(ValueError, match="prompt"):
        s.start([0, 6])
    with pytest.raises(ValueError, match="vocab_size"):
        Sampler(SamplingParams(), 0)


# -- seeds and draws -----------------------------------------------------------------------------


def generate(sampler: Sampler, steps: int = 50) -> list[int]:
    """A fake decode loop: the logits depend on the step and on the last token."""
    sampler.start([3, 1, 4, 1, 5])
    tokens = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step * 7919 + (tokens[-1] if tokens else 0))
        logits = torch.randn(1000, generator=g) * 3
        token, _, _ = sampler.sample(logits)
        sampler.accept(token)
        tokens.append(token)
    return tokens


def test_same_seed_same_tokens_different_seed_differs() -> None:
    params = SamplingParams(temperature=1.0, top_k=100, top_p=0.95, repetition_penalty=1.1, seed=1234)
    first = generate(Sampler(params, 1000))
    assert first == generate(Sampler(params, 1000))
    assert first != generate(Sampler(params.replace(seed=1235), 1000))
    assert len(set(first)) > 10  # it really sampled
    reused = Sampler(params, 1000)  # start() reseeds: a reused sampler repeats itself
    assert generate(reused) == first and generate(reused) == first


def test_no_seed_draws_a_fresh_one() -> None:
    params = SamplingParams(temperature=1.0)
    a, b = Sampler(params, 1000), Sampler(params, 1000)
    tokens_a, tokens_b = generate(a), generate(b)  # each start() draws a new seed
    assert a.seed != b.seed and tokens_a != tokens_b
    # the seed in use is reported, so a run can be replayed
    assert generate(Sampler(params.replace(seed=a.seed), 1000)) == tokens_a
    assert generate(a) != tokens_a  # a seedless sampler does not repeat itself


def test_draw_frequencies_match_probs() -> None:
    params = SamplingParams(temperature=0.8, top_k=5, repetition_penalty=1.2, seed=7)
    s = Sampler(params, 6)
    s.start([1])
    logits = torch.tensor(LOGITS)
    probs = s.probs(logits).tolist()
    assert probs[5] == 0.0
    n = 6000
    counts = [0] * 6
    for _ in range(n):
        counts[s.sample(logits)[0]] += 1
    assert counts[5] == 0
    chi2 = sum((counts[i] - n * probs[i]) ** 2 / (n * probs[i]) for i in range(5))
    assert chi2 < 25.0, (counts, probs)  # 4 degrees of freedom: p(chi2 > 18.5) = 0.001


def test_logprob_is_raw_log_softmax_at_the_chosen_token() -> None:
    # penalties and temperature change the draw, not the reported logprob
    log_z = math.log(sum(math.exp(v) for v in LOGITS))
    params = SamplingParams(temperature=0.7, repetition_penalty=1.5, presence_penalty=1.0, logprobs=True)
    for seed in range(10):
        s = Sampler(params.replace(seed=seed), 6)
        s.start([0])
        s.accept(0)
        token, logprob, _ = s.sample(torch.tensor(LOGITS))
        assert logprob == pytest.approx(LOGITS[token] - log_z, abs=1e-5)
    token, logprob, _ = Sampler(SamplingParams(logprobs=True), 6).sample(torch.tensor(LOGITS))
    assert (token, logprob) == (0, pytest.approx(2.0 - log_z, abs=1e-5))
    assert Sampler(SamplingParams(temperature=1.0, seed=0), 6).sample(torch.tensor(LOGITS))[1] is None


def test_matches_transformers_logits_processors() -> None:
    lp = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    prompt, generated = [3, 7, 7, 11], [2, 7, 30]
    for temperature, top_k, top_p, min_p, rep in [
        (1.0, 0, 1.0, 0.0, 1.0),
        (0.6, 10, 0.9, 0.0, 1.3),
        (1.3, 0, 0.7, 0.05, 0.8),
        (0.9, 25, 1.0, 0.1, 1.1),
        (2.0, 8, 0.5, 0.2, 1.5),
    ]:
        logits = torch.randn(40, generator=g) * 2
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=rep)
        chain = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(rep)])
        chain.append(lp.TemperatureLogitsWarper(temperature))
        if top_k:
            chain.append(lp.TopKLogitsWarper(top_k))
        if top_p < 1:
            chain.append(lp.TopPLogitsWarper(top_p))
        if min_p:
            chain.append(lp.MinPLogitsWarper(min_p))
        input_ids = torch.tensor([prompt + generated])
        expected = chain(input_ids, logits.clone()[None]).softmax(-1)[0]
        actual = run_probs(params, logits.tolist(), prompt=prompt, generated=generated)
        assert torch.allclose(torch.tensor(actual), expected, atol=1e-6), params


# -- SamplingParams ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("seed", -1),
        ("seed", 1.0),
        ("stop", ("ok", "")),
        ("stop_token_ids", (2, -1)),
        ("ignore_eos", 1),
        ("logprobs", "yes"),
        ("top_logprobs", -1),
        ("top_logprobs", 21),
        ("top_logprobs", 2.0),
        ("top_logprobs", True),
    ],
)
def test_params_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as err:
        SamplingParams(**{field: value})
    message = str(err.value)
    assert "\n" not in message and "must be" in message


def test_params_normalisation_and_replace() -> None:
    p = SamplingParams(stop=["</s>", "User:"], stop_token_ids=[2, 3])
    assert p.stop == ("</s>", "User:") and p.stop_token_ids == (2, 3)
    assert SamplingParams(stop="###").stop == ("###",)
    assert hash(p) == hash(SamplingParams(stop=("</s>", "User:"), stop_token_ids=(2, 3)))
    q = p.replace(temperature=0.7, top_p=0.9)
    assert (q.temperature, q.top_p, q.stop) == (0.7, 0.9, p.stop)
    assert p.greedy and not q.greedy
    with pytest.raises(ValueError, match="top_p"):
        p.replace(top_p=2.0)
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]


# -- top logprobs ----------------------------------------------------------------------------


def test_top_logprobs_implies_logprobs() -> None:
    assert SamplingParams(top_logprobs=3).logprobs
    assert SamplingParams(top_logprobs=3).replace(temperature=0.5).top_logprobs == 3
    assert not SamplingParams().logprobs and SamplingParams().top_logprobs == 0


def test_top_logprobs_are_the_raw_log_softmax_topk() -> None:
    torch.manual_seed(0)
    logits = torch.randn(50) * 3
    ref = torch.log_softmax(logits, dim=-1)
    want_lp, want_ids = ref.topk(5)
    for params in (SamplingParams(top_logprobs=5),
                   SamplingParams(top_logprobs=5, temperature=0.8, top_k=10, repetition_penalty=1.4, seed=3)):
        s = Sampler(params, 50)
        s.start([int(want_ids[0])])
        token, logprob, top = s.sample(logits)
        assert [t for t, _ in top] == want_ids.tolist()
        assert [lp for _, lp in top] == pytest.approx(want_lp.tolist(), abs=1e-5)
        assert logprob == pytest.approx(float(ref[token]), abs=1e-5)
    # greedy without penalties: the chosen token is the top-1, with its logprob
    token, logprob, top = Sampler(SamplingParams(top_logprobs=1), 50).sample(logits)
    assert token == top[0][0] == int(logits.argmax()) and logprob == pytest.approx(top[0][1], abs=1e-6)
    assert Sampler(SamplingParams(), 50).sample(logits) == (token, None, None)


def test_top_logprobs_past_the_vocabulary_are_all_tokens() -> None:
    _, _, top = Sampler(SamplingParams(top_logprobs=20), 6).sample(torch.tensor(LOGITS))
    assert len(top) == 6 and top[0][0] == 0
    assert math.fsum(math.exp(lp) for _, lp in top) == pytest.approx(1.0, abs=1e-5)


def test_pick_packs_one_tensor_for_the_transfer() -> None:
    s = Sampler(SamplingParams(top_logprobs=2), 6)
    token, packed = s.pick(torch.tensor(LOGITS))
    assert packed.dtype == torch.float32 and packed.shape == (2 + 2 * 2,)
    assert Sampler.unpack(packed.tolist()) == s.sample(torch.tensor(LOGITS))
    assert Sampler(SamplingParams(), 6).pick(torch.tensor(LOGITS))[1] is None   # the plain greedy path: the token only
