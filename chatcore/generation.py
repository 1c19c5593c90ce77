"""What one generation yields and reports: token events, final stats on every end (a closed stream's
too), the stream object, and the per-reply state the engine's decode loops share."""

from __future__ import annotations

import inspect
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import torch

from chatcore.detokenize import IncrementalDetokenizer
from chatcore.sampling import Sampler, SamplingParams, TopLogprobs
from chatcore.stopping import StopStrings
from chatcore.tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    cached_tokens: int          # prompt tokens the slot already held (not recomputed)
    prefill_tokens: int         # prompt tokens computed by this call
    generated_tokens: int
    prefill_s: float
    ttft_s: float               # call start to the first sampled token
    decode_s: float
    finish_reason: str          # "stop" (EOS, stop token or stop string), "length", or "cancelled" (closed early)
    discarded_tokens: int = 0   # tokens the sink window shifted out of the cache during this call

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. ``text`` is what to show now (may be empty while text is held back).

    The last event of a generation carries ``finish_reason`` and ``stats``; when it ends on EOS or a
    stop token, that token is not part of the reply and its ``text`` only flushes what was held back.
    ``logprob`` (with ``SamplingParams.logprobs``) and ``top_logprobs`` (with ``SamplingParams.top_logprobs``:
    the most likely ``(token_id, logprob)`` pairs of the step, most likely first) are about ``token_id``'s step.
    """

    token_id: int
    text: str
    logprob: float | None = None
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    top_logprobs: TopLogprobs | None = None


@dataclass(frozen=True)
class ScoreResult:
    """What :meth:`Engine.score` found: ``tokens`` continuation tokens scored, their mean negative
    log-likelihood ``nll`` and the fraction ``top1`` that are the greedy choice (both None when there were none);
    the prompt's cache figures as in :class:`GenerationStats`, and ``ttft_s``, the call start to the logits."""

    tokens: int
    nll: float | None
    top1: float | None
    prompt_tokens: int
    cached_tokens: int
    prefill_tokens: int
    ttft_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        return 0.0   # nothing is decoded


def score_result(logits: torch.Tensor, ids: list[int], cont: list[int], keep: int, ttft: float) -> ScoreResult:
    """The :class:`ScoreResult` of ``cont`` after ``ids`` from the logits of the prefill of ``(ids + cont)[keep:]``
    (``keep`` prompt tokens were already cached)."""
    nll = top1 = None
    if cont:
        rows = logits[len(ids) - 1 - keep: len(ids) + len(cont) - 1 - keep].float()   # the rows that predict cont
        target = torch.tensor(cont, dtype=torch.long, device=rows.device)
        logp = torch.log_softmax(rows, dim=-1).gather(1, target[:, None])[:, 0]
        nll = -logp.mean().item()
        top1 = (rows.argmax(dim=-1) == target).float().mean().item()
    return ScoreResult(tokens=len(cont), nll=nll, top1=top1, prompt_tokens=len(ids), cached_tokens=keep,
                       prefill_tokens=len(ids) - keep, ttft_s=ttft)


class Generation:
    """The stream of one :meth:`Engine.generate` call: iterate it for :class:`TokenEvent`s.

    ``stats`` is None until it ends, then the :class:`GenerationStats` of every end: those of its last event,
    or, when the caller closes it before that (``close()``), stats with finish_reason "cancelled" counting the
    tokens it yielded. The slot then holds the prompt and those tokens. Iterating it is iterating a plain
    generator: no work per token beside it.
    """

    def __init__(self, reply: ReplyState, events: Generator[TokenEvent, None, None]) -> None:
        self._reply = reply
        self._events = events

    @property
    def stats(self) -> GenerationStats | None:
        return self._reply.stats

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._events

    def __next__(self) -> TokenEvent:
        return next(self._events)

    def close(self) -> None:
        """End it now (nothing when it has ended)."""
        unstarted = inspect.getgeneratorstate(self._events) == inspect.GEN_CREATED
        self._events.close()
        if unstarted:
            self._reply.cancelled()


class ReplyState:
    """One generation's state beside its decode loop: sampling, stop strings, the detokenizer, the prefill's
    cost, and the end (held-back text flushed, final stats)."""

    def __init__(self, ids: list[int], params: SamplingParams, cached: int, t0: float, discarded: int, *,
                 vocab_size: int, device: torch.device, tokenizer: Tokenizer | None, eos_ids: frozenset[int]) -> None:
        self.prefill_s = time.perf_counter() - t0
        self.t0, self.prompt_tokens, self.cached, self.discarded = t0, len(ids), cached, discarded
        self.sampler = Sampler(params, vocab_size, device)
        self.sampler.start(ids)
        self.stops = StopStrings(params.stop)
        self.detok = IncrementalDetokenizer(tokenizer.decode, prefix_ids=ids[-6:]) if tokenizer is not None else None
        self.end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.limit = params.max_new_tokens
        self.stats: GenerationStats | None = None   # set at the end (not a reference to the Generation: no cycle)

        self.n, self.t_first = 0, 0.0   # tokens read so far; when the first was read (0.0 before any)

    def take(self, token: int) -> tuple[bool, str, bool]:
        """Count a sampled token: (ended: an end token, text to show now, stopped: a stop string ended it)."""
        self.n += 1
        if self.n == 1:
            self.t_first = time.perf_counter()
        self.sampler.accept(token)
        if token in self.end_ids:
            return True, "", False
        if self.detok is None:
            return False, "", False
        text, stopped = self.stops.feed(self.detok.push(token))
        return False, text, stopped

    def _stats(self, generated: int, finish: str) -> GenerationStats:
        t_first = self.t_first
        self.stats = GenerationStats(
            prompt_tokens=self.prompt_tokens, cached_tokens=self.cached,
            prefill_tokens=self.prompt_tokens - self.cached, generated_tokens=generated, prefill_s=self.prefill_s,
            ttft_s=t_first - self.t0 if t_first else 0.0, decode_s=time.perf_counter() - t_first if t_first else 0.0,
            finish_reason=finish, discarded_tokens=self.discarded)
        return self.stats

    def cancelled(self) -> None:
        """The caller closed the stream after the tokens it was given."""
        self._stats(self.n, "cancelled")

    def last(self, token: int, text: str, logprob: float | None, ended: bool, stopped: bool,
             top: TopLogprobs | None = None) -> TokenEvent:
        """The last event: on EOS or a stop token (``ended``), that token is not part of the reply; what the
        detokenizer and the stop strings held back is flushed unless a stop string ended it."""
        finish = "stop" if ended or stopped else "length"
        if not stopped and self.detok is not None:
            tail, stopped = self.stops.feed(self.detok.flush())
            text += tail + ("" if stopped else self.stops.flush())
        return TokenEvent(token, text, logprob, finish, self._stats(self.n - ended, finish), top)
