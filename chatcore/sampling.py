"""Choosing the next token: penalties, temperature, top-k, top-p, min-p and a per-request seed.

`SamplingParams` is the frozen, validated per-request configuration. `Sampler` turns one step's
logits into a token id. Its penalty state (a seen-mask over prompt + generated tokens and the
per-id counts of generated tokens) lives in device tensors, so a step costs O(vocab) on the
device and nothing proportional to the history, and the only host synchronisation is reading
the chosen token id back.

The processing order is the one Hugging Face transformers uses (and vLLM for the two OpenAI
penalties): repetition penalty, presence / frequency penalties, temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, NamedTuple

import torch

# Token ids travel back to the host as float32 together with the logprob (one transfer);
# float32 holds every integer below 2**24 exactly, far above any vocabulary in use.
_MAX_VOCAB = 2**24
MAX_TOP_LOGPROBS = 20  # as OpenAI's API

# What one step reports beside the token: (logprob or None, top (token id, logprob) pairs or None)
TopLogprobs = tuple[tuple[int, float], ...]


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _fail(name: str, allowed: str, value: object) -> ValueError:
    return ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling configuration (validated on construction; hashable)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # HF/CTRL style, applied to prompt + generated tokens
    presence_penalty: float = 0.0  # OpenAI style, generated tokens only
    frequency_penalty: float = 0.0  # OpenAI style, generated tokens only
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()  # a list or a single string is accepted and stored as a tuple
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # 1..20: also the most likely tokens at each step, with their logprobs (implies logprobs)

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate()
        if self.top_logprobs:
            object.__setattr__(self, "logprobs", True)

    def _validate(self) -> None:
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            raise _fail("max_new_tokens", "an int >= 1", self.max_new_tokens)
        if not (_is_real(self.temperature) and self.temperature >= 0):
            raise _fail("temperature", "a finite number >= 0 (0 = greedy)", self.temperature)
        if not (_is_int(self.top_k) and self.top_k >= 0):
            raise _fail("top_k", "an int >= 0 (0 = off)", self.top_k)
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            raise _fail("top_p", "in (0, 1] (1 = off)", self.top_p)
        if not (_is_real(self.min_p) and 0 <= self.min_p <= 1):
            raise _fail("min_p", "in [0, 1] (0 = off)", self.min_p)
        if not (_is_real(self.repetition_penalty) and self.repetition_penalty > 0):
            raise _fail("repetition_penalty", "a finite number > 0 (1 = off)", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (_is_real(value) and -2 <= value <= 2):
                raise _fail(name, "in [-2, 2] (0 = off)", value)
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**64):
            raise _fail("seed", "None or an int in [0, 2**64)", self.seed)
        for s in self.stop:
            if not (isinstance(s, str) and s):
                raise _fail("stop", "a tuple of non-empty strings", self.stop)
        for t in self.stop_token_ids:
            if not (_is_int(t) and t >= 0):
                raise _fail("stop_token_ids", "a tuple of ints >= 0", self.stop_token_ids)
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, "a bool", getattr(self, name))
        if not (_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise _fail("top_logprobs", f"an int in [0, {MAX_TOP_LOGPROBS}] (0 = off)", self.top_logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


class Sampled(NamedTuple):
    """One step's choice on the host: the token, and (when asked for) its logprob and the top tokens."""

    token: int
    logprob: float | None
    top_logprobs: TopLogprobs | None


def logprob_report(raw: torch.Tensor, token: torch.Tensor, k: int) -> torch.Tensor:
    """``[token, logprob, k ids, k logprobs]`` as one float32 device tensor (one transfer reads it): the
    log_softmax of the raw float32 logits ``raw`` [vocab] at ``token`` and at its ``k`` most likely ids."""
    log_z = torch.logsumexp(raw, dim=-1)
    head = torch.stack([token.to(torch.float32), raw.gather(0, token.reshape(1))[0] - log_z])
    if k == 0:
        return head
    values, ids = raw.topk(min(k, raw.shape[-1]))
    return torch.cat([head, ids.to(torch.float32), values - log_z])


class Sampler:
    """Turns one decode step's logits into a token for one request.

    Use: ``start(prompt_ids)`` once per request, then per step ``token, logprob, top = sample(logits)``
    followed by ``accept(token)`` (sample does not record the token itself, so the engine may
    also force tokens through ``accept``).

    ``start`` reseeds the private generator from ``params.seed`` (or a fresh random seed, kept in
    ``self.seed``), so one Sampler reused for several requests with a fixed seed repeats itself.
    Draws are reproducible for the same seed, inputs and device type (CPU and CUDA generators
    produce different streams).
    """

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device | str = "cpu") -> None:
        if not (_is_int(vocab_size) and 1 <= vocab_size <= _MAX_VOCAB):
            raise ValueError(f"Sampler vocab_size must be an int in [1, {_MAX_VOCAB}], got {vocab_size!r}")
        self.params = params
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device)
        self._use_repetition = params.repetition_penalty != 1
        self._use_counts = params.presence_penalty != 0 or params.frequency_penalty != 0
        self._seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        self._counts = torch.zeros(self.vocab_size, dtype=torch.float32, device=self.device)
        self._generator = torch.Generator(device=self.device)
        self.seed = 0
        self.start(())

    # -- per-request state -------------------------------------------------------------------

    def start(self, prompt_ids: Sequence[int]) -> None:
        """Begin a request: clear penalty state, mark the prompt's tokens as seen, reseed."""
        self._seen.zero_()
        self._counts.zero_()
        if self._use_repetition and len(prompt_ids) > 0:
            ids = torch.as_tensor(prompt_ids, dtype=torch.long)
            lo, hi = int(ids.min()), int(ids.max())  # prompt ids are usually host data: no sync
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {lo}..{hi}")
            self._seen.index_fill_(0, ids.to(self.device), True)
        self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self._generator.manual_seed(self.seed)

    def accept(self, token_id: int) -> None:
        """Record a generated token for the penalties (device-side updates, no sync)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id must be in [0, {self.vocab_size}), got {token_id}")
        # fill_/add_ on a view: a kernel with a scalar argument (item assignment would copy host->device)
        if self._use_repetition:
            self._seen[token_id].fill_(True)
        if self._use_counts:
            self._counts[token_id].add_(1)

    # -- one step ----------------------------------------------------------------------------

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution `sample` draws from: float32 [vocab] summing to 1.

        After penalties, temperature, top-k, top-p and min-p; for temperature 0 it is one-hot at
        the argmax of the penalised logits.
        """
        scores = self._scores(self._upcast(logits))
        if self.params.greedy:
            onehot = torch.zeros_like(scores)
            return onehot.scatter_(0, scores.argmax().unsqueeze(0), 1.0)
        return scores.softmax(dim=-1)

    def sample(self, logits: torch.Tensor) -> Sampled:
        """Choose the next token; returns ``(token_id, logprob or None, top_logprobs or None)``.

        The logprob (only when ``params.logprobs``) is ``log_softmax`` of the raw model logits,
        before penalties, temperature and filtering, at the chosen token -- what vLLM reports by
        default. With ``params.top_logprobs`` = k, also the k most likely tokens of that same
        distribution as ``((token_id, logprob), ...)``, most likely first. Exactly one
        device->host transfer happens (token id, logprob and the top k packed together).
        """
        token, packed = self.pick(logits)
        if packed is None:
            return Sampled(int(token.item()), None, None)
        return self.unpack(packed.tolist())

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`sample` without the transfer: the token id (int64, 0-d) on the device and, when logprobs are
        asked for, the packed float32 report :meth:`unpack` reads (``[token, logprob, k ids, k logprobs]``)."""
        p = self.params
        if p.greedy and not (self._use_repetition or self._use_counts or p.logprobs):
            self._upcast_check(logits)
            return logits.argmax(), None   # the argmax of the raw logits: no float32 copy of the vocabulary
        raw = self._upcast(logits)
        scores = self._scores(raw)
        if p.greedy:
            token = scores.argmax()
        else:
            # Gumbel-max: argmax(x_i - log E_i) with E_i ~ Exp(1) is argmax(p_i / E_i), which picks i
            # with probability p_i = softmax(x)_i; no softmax, and no host sync (unlike multinomial).
            race = torch.empty_like(scores).exponential_(generator=self._generator)
            token = (scores - race.clamp_min_(torch.finfo(torch.float32).tiny).log_()).argmax()
        if not p.logprobs:
            return token, None
        return token, logprob_report(raw, token, p.top_logprobs)

    @staticmethod
    def unpack(values: Sequence[float]) -> Sampled:
        """The host copy of :meth:`pick`'s packed report as ``(token_id, logprob, top_logprobs or None)``."""
        k = (len(values) - 2) // 2
        top = tuple(zip((int(i) for i in values[2:2 + k]), values[2 + k:], strict=True)) if k else None
        return Sampled(int(values[0]), values[1], top)

    # -- shared processing -------------------------------------------------------------------

    def _upcast_check(self, logits: torch.Tensor) -> None:
        if logits.dim() != 1 or logits.shape[0] != self.vocab_size or not logits.is_floating_point():
            got = f"{tuple(logits.shape)} {logits.dtype}"
            raise ValueError(f"logits must be a 1-D float tensor of size {self.vocab_size}, got {got}")

    def _upcast(self, logits: torch.Tensor) -> torch.Tensor:
        self._upcast_check(logits)
        return logits.float()  # every step below is out of place: the caller's tensor is untouched

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        """Processed float32 logits; removed tokens are -inf. Greedy stops after the penalties.

        Same results as the HF processors, computed without a softmax over the vocabulary (a
        single-row softmax is one slow GPU block) and without topk (which synchronises on CUDA).
        """
        p = self.params
        if self._use_repetition:  # CTRL / HF: divide positive logits, multiply negative ones
            r = p.repetition_penalty
            x = torch.where(self._seen, torch.where(x < 0, x * r, x / r), x)
        if self._use_counts:  # OpenAI: counts of generated tokens; counts.sign() is "present"
            x = x.sub(self._counts, alpha=p.frequency_penalty)
            x = x.sub_(self._counts.sign(), alpha=p.presence_penalty)
        if p.greedy:
            return x
        if p.temperature != 1:
            x = x / p.temperature
        top_k = 0 < p.top_k < self.vocab_size
        if top_k or p.top_p < 1:  # one descending sort serves both
            s, order = torch.sort(x, descending=True)
            if top_k:  # ties with the k-th value are kept, as in HF
                s = s.masked_fill(s < s[p.top_k - 1], -math.inf)
            if p.top_p < 1:
                # HF drops the low tail whose mass is <= 1 - top_p, i.e. keeps a token while the mass
                # strictly above it is < top_p (so the top token always stays). e = unnormalised probs.
                e = (s - s[0]).exp()
                cum = e.cumsum(dim=0)
                s = s.masked_fill(cum - e >= p.top_p * cum[-1], -math.inf)
            x = torch.empty_like(x).scatter_(0, order, s)
        if p.min_p > 0:  # p_i < min_p * p_max  <=>  x_i < x_max + log(min_p); after temperature, as HF
            x = x.masked_fill(x < x.max() + math.log(p.min_p), -math.inf)
        return x
