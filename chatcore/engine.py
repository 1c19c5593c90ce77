"""The engine: token ids in, token ids (and their text) out, one KV cache slot per sequence."""

from __future__ import annotations

import array
import inspect
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from chatcore.config import ModelConfig
from chatcore.detokenize import IncrementalDetokenizer
from chatcore.errors import PromptTooLong, TokenizerMissing
from chatcore.kv_cache import KVCache
from chatcore.models.base import CausalModel
from chatcore.prefix import reused_prefix
from chatcore.runtime import Runtime, activation_bytes_per_token, fit_chunk
from chatcore.sampling import Sampler, SamplingParams
from chatcore.stopping import StopStrings
from chatcore.tokenizer import Tokenizer

if TYPE_CHECKING:
    from chatcore.cuda_graph import DecodeGraph


class _TokenFetch:
    """Reads a sampled token (and logprob) from the device without waiting for work queued after it."""

    def __init__(self) -> None:
        self.token = torch.empty(1, dtype=torch.int64, pin_memory=True)
        self.logprob = torch.empty(1, dtype=torch.float32, pin_memory=True)
        self.event = torch.cuda.Event()
        self.with_logprob = False

    def start(self, token: torch.Tensor, logprob: torch.Tensor | None) -> None:
        self.token.copy_(token.reshape(1), non_blocking=True)
        self.with_logprob = logprob is not None
        if logprob is not None:
            self.logprob.copy_(logprob.reshape(1), non_blocking=True)
        self.event.record()

    def result(self) -> tuple[int, float | None]:
        self.event.synchronize()
        return int(self.token[0]), (float(self.logprob[0]) if self.with_logprob else None)


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
    """

    token_id: int
    text: str
    logprob: float | None = None
    finish_reason: str | None = None
    stats: GenerationStats | None = None


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


class Generation:
    """The stream of one :meth:`Engine.generate` call: iterate it for :class:`TokenEvent`s.

    ``stats`` is None until it ends, then the :class:`GenerationStats` of every end: those of its last event,
    or, when the caller closes it before that (``close()``), stats with finish_reason "cancelled" counting the
    tokens it yielded. The slot then holds the prompt and those tokens. Iterating it is iterating a plain
    generator: no work per token beside it.
    """

    def __init__(self, reply: _Reply, events: Generator[TokenEvent, None, None]) -> None:
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


class _Reply:
    """One generation's state beside its decode loop: sampling, stop strings, the detokenizer, the prefill's
    cost, and the end (held-back text flushed, final stats)."""

    def __init__(self, engine: Engine, ids: list[int], params: SamplingParams, cached: int, t0: float,
                 discarded: int) -> None:
        self.prefill_s = time.perf_counter() - t0
        self.t0, self.prompt_tokens, self.cached, self.discarded = t0, len(ids), cached, discarded
        self.sampler = Sampler(params, engine.config.vocab_size, engine.runtime.device)
        self.sampler.start(ids)
        self.stops = StopStrings(params.stop)
        tok = engine.tokenizer
        self.detok = IncrementalDetokenizer(tok.decode, prefix_ids=ids[-6:]) if tok is not None else None
        self.end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(engine.eos_token_ids))
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

    def last(self, token: int, text: str, logprob: float | None, ended: bool, stopped: bool) -> TokenEvent:
        """The last event: on EOS or a stop token (``ended``), that token is not part of the reply; what the
        detokenizer and the stop strings held back is flushed unless a stop string ended it."""
        finish = "stop" if ended or stopped else "length"
        if not stopped and self.detok is not None:
            tail, stopped = self.stops.feed(self.detok.flush())
            text += tail + ("" if stopped else self.stops.flush())
        return TokenEvent(token, text, logprob, finish, self._stats(self.n - ended, finish))


class Engine:
    def __init__(self, model: CausalModel, config: ModelConfig, runtime: Runtime, tokenizer: Tokenizer | None,
                 source: str = "") -> None:
        self.model = model
        self.config = config
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.source = source
        eos = set(config.eos_token_ids)
        if tokenizer is not None:
            eos.update(tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        self._graph_pool = None
        self._fetch: _TokenFetch | None = None

    @property
    def window(self) -> int:
        return self.runtime.max_seq_len

    def new_slot(self, capacity: int | None = None) -> KVCache:
        """A KV cache slot to keep between calls (its tokens are reused as a prefix).

        With CUDA graphs the slot is allocated whole up front (a captured graph needs buffers that never move).
        """
        return self.model.new_slot(min(capacity or self.window, self.window),
                                    preallocate=self.runtime.uses_cuda_graphs)

    # -- forward passes -----------------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        # one C pass that refuses anything but integers, then a vectorised range check: a 33k-token warm turn's
        # history costs ~0.3 ms here (numpy's asarray + tolist took ~2 ms of a 30 ms time to first token)
        if isinstance(ids, (str, bytes)):
            raise ValueError("the prompt must be a flat sequence of integer token ids")
        try:
            arr = np.frombuffer(array.array("q", ids), dtype=np.int64)
        except (TypeError, OverflowError):
            raise ValueError("the prompt must be a flat sequence of integer token ids") from None
        if arr.size == 0:
            raise ValueError("the prompt is empty: give at least one token")
        bad = arr[(arr < 0) | (arr >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids if type(ids) is list else arr.tolist()

    @torch.inference_mode()
    def _run(self, ids: Sequence[int], slot: KVCache, *, all_logits: bool = False) -> torch.Tensor:
        x = torch.tensor(ids, dtype=torch.long, device=self.runtime.device)
        out = self.model.forward(x, slot, all_logits=all_logits)
        slot.commit(ids)
        return out

    def _graph(self, slot: KVCache):  # noqa: ANN202
        """The slot's captured decode step (captured on first use), or None where graphs do not apply."""
        if not (self.runtime.uses_cuda_graphs and slot.allocated == slot.capacity):
            return None
        if slot.decode_graph is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            slot.decode_graph = self.model.capture_decode(slot, self._graph_pool)
        return slot.decode_graph

    @torch.inference_mode()
    def _step(self, token: int, slot: KVCache) -> torch.Tensor:
        """One decode step: the slot's CUDA graph when it has one, else an eager forward pass."""
        graph = self._graph(slot)
        if graph is None:
            return self._run([token], slot)[-1]
        logits = graph.step(token)
        slot.commit([token])
        return logits[-1]

    def prefill(self, ids: Sequence[int], slot: KVCache, *, all_logits: bool = False,
                sink_tokens: int | None = None) -> torch.Tensor:
        """Append ``ids`` to the slot in chunks; return logits of the last token (or of all tokens).

        With ``sink_tokens``, a slot that fills up keeps its first ``sink_tokens`` tokens and drops the
        oldest ones after them (StreamingLLM), so ``ids`` may be longer than the window.
        """
        chunk = self.prefill_chunk_size()
        if sink_tokens is None:
            if slot.length + len(ids) > slot.capacity:
                raise PromptTooLong(
                    f"the prompt needs {slot.length + len(ids)} tokens but the context window is "
                    f"{slot.capacity}; shorten it or raise the window")
        else:
            chunk = min(chunk, self._shift_size(slot, sink_tokens))
        outs = []
        for i in range(0, len(ids), chunk):
            piece = ids[i : i + chunk]
            if sink_tokens is not None:
                self.make_room(slot, len(piece), sink_tokens)
            outs.append(self._run(piece, slot, all_logits=all_logits))
        return torch.cat(outs) if all_logits else outs[-1]

    def prefill_chunk_size(self) -> int:
        """Prompt tokens per forward pass now: the runtime's, lowered on a GPU (default setting) to what half the
        memory free now holds (free on the device plus what PyTorch's allocator holds unused)."""
        rt = self.runtime
        if not (rt.chunk_by_memory and rt.device.type == "cuda"):
            return rt.prefill_chunk
        free, _ = torch.cuda.mem_get_info(rt.device)
        free += torch.cuda.memory_reserved(rt.device) - torch.cuda.memory_allocated(rt.device)
        per_token = activation_bytes_per_token(self.config.hidden_size, self.config.intermediate_size, rt.dtype)
        return fit_chunk(rt.prefill_chunk, free // 2, per_token)

    @staticmethod
    def _shift_size(slot: KVCache, sink_tokens: int) -> int:
        """Tokens one shift frees: half of what is not a sink (as llama.cpp's context shift)."""
        if not 0 <= sink_tokens < slot.capacity - 1:
            raise ValueError(f"sink_tokens must be in [0, {slot.capacity - 2}] for a window of {slot.capacity}")
        return max(1, (slot.capacity - sink_tokens) // 2)

    def make_room(self, slot: KVCache, need: int, sink_tokens: int) -> int:
        """Shift the slot's oldest non-sink tokens out until ``need`` more fit; returns tokens dropped."""
        overflow = slot.length + need - slot.capacity
        if overflow <= 0:
            return 0
        drop = min(max(overflow, self._shift_size(slot, sink_tokens)), slot.length - sink_tokens)
        if drop < overflow:
            raise PromptTooLong(f"{need} new tokens do not fit a window of {slot.capacity} beside "
                                f"{sink_tokens} sink tokens")
        slot.drop(sink_tokens, sink_tokens + drop)
        return drop

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits [len(ids), vocab] (float32, on the CPU) for scoring and checks; uses a scratch slot."""
        ids = self._check_ids(ids)
        return self.prefill(ids, self.new_slot(len(ids)), all_logits=True).float().cpu()

    # -- generation --------------------------------------------------------------------------------
    def generate(self, ids: Sequence[int], params: SamplingParams | None = None, *,
                 slot: KVCache | None = None, sink_tokens: int | None = None) -> Generation:
        """Stream the continuation of ``ids``. With a ``slot``, its matching prefix is not recomputed.

        The prompt is prefilled now (so :class:`PromptTooLong` is raised here); tokens come as the returned
        :class:`Generation` is iterated. ``sink_tokens``: instead of stopping when the window is full, keep the
        first ``sink_tokens`` tokens and shift the oldest others out (a sliding window with attention sinks), so
        prompt and reply together may run past the window with flat memory and no re-prefill.
        """
        params = params or SamplingParams()
        ids = self._check_ids(ids)
        slot = slot if slot is not None else self.new_slot()
        if sink_tokens is None and len(ids) > slot.capacity:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens but the context window is {slot.capacity}; "
                                "shorten it or raise the window")
        t0 = time.perf_counter()
        keep = reused_prefix(slot.tokens, ids)
        slot.truncate(keep)
        before = slot.length
        logits = self.prefill(ids[keep:], slot, sink_tokens=sink_tokens)[-1]
        reply = _Reply(self, ids, params, keep, t0, discarded=before + len(ids) - keep - slot.length)
        graph = self._graph(slot) if slot.length < slot.capacity else None
        if graph is not None:
            events = self._decode_graph(reply, logits, slot, graph, sink_tokens)
        else:
            events = self._decode_eager(reply, logits, slot, sink_tokens)
        return Generation(reply, events)

    def _decode_graph(self, reply: _Reply, logits: torch.Tensor, slot: KVCache, graph: DecodeGraph,
                      sink_tokens: int | None) -> Iterator[TokenEvent]:
        """Decode on the GPU with the slot's CUDA graph. The next step is queued on the sampled token before the
        host reads it (through pinned memory), so the host's work per token (reading it, detokenizing, stop
        strings, the caller) overlaps the GPU's. A step queued for a token that ends the reply is dropped: it
        wrote only the row past the slot's last token."""
        if self._fetch is None:
            self._fetch = _TokenFetch()   # pinned host memory: allocated once per engine
        fetch, sampler, limit, sinks = self._fetch, reply.sampler, reply.limit, sink_tokens is not None
        try:
            while True:
                token_t, logprob_t = sampler.pick(logits)
                fetch.start(token_t, logprob_t)
                more = reply.n + 1 < limit and (sinks or slot.length < slot.capacity)
                if more:
                    if slot.length >= slot.capacity:
                        reply.discarded += self.make_room(slot, 1, sink_tokens)
                    logits = graph.launch(token_t)[-1]
                token, logprob = fetch.result()
                ended, text, stopped = reply.take(token)
                if ended:
                    break
                if more:
                    slot.commit([token])   # the queued step ran on this token: its keys/values are in the slot
                if stopped or not more:
                    break
                yield TokenEvent(token, text, logprob)
        except GeneratorExit:
            reply.cancelled()
            raise
        yield reply.last(token, text, logprob, ended, stopped)

    def _decode_eager(self, reply: _Reply, logits: torch.Tensor, slot: KVCache,
                      sink_tokens: int | None) -> Iterator[TokenEvent]:
        """Decode step by step: sample, read the token, run the step on it (the slot's CUDA graph where it has
        one, else a forward pass)."""
        sampler, limit, sinks = reply.sampler, reply.limit, sink_tokens is not None
        try:
            while True:
                token, logprob = sampler.sample(logits)
                ended, text, stopped = reply.take(token)
                if ended:
                    break
                more = reply.n < limit and (sinks or slot.length < slot.capacity)
                if more:
                    if slot.length >= slot.capacity:
                        reply.discarded += self.make_room(slot, 1, sink_tokens)
                    logits = self._step(token, slot)
                if stopped or not more:
                    break
                yield TokenEvent(token, text, logprob)
        except GeneratorExit:
            reply.cancelled()
            raise
        yield reply.last(token, text, logprob, ended, stopped)

    # -- scoring -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, ids: Sequence[int], continuation: Sequence[int], *, slot: KVCache | None = None) -> ScoreResult:
        """How well the model predicts ``continuation`` after the prompt ``ids``, in one prefill of both.

        With a ``slot``, its matching prefix of ``ids`` is not recomputed (as in :meth:`generate`); afterwards
        it holds ``ids`` and ``continuation``. Raises :class:`PromptTooLong` when they do not fit it.
        """
        ids = self._check_ids(ids)
        cont = self._check_ids(continuation) if len(continuation) else []
        slot = slot if slot is not None else self.new_slot()
        full = ids + cont
        t0 = time.perf_counter()
        keep = reused_prefix(slot.tokens, ids)
        slot.truncate(keep)
        logits = self.prefill(full[keep:], slot, all_logits=True)
        ttft = time.perf_counter() - t0
        nll = top1 = None
        if cont:
            rows = logits[len(ids) - 1 - keep: len(full) - 1 - keep].float()   # the rows that predict `cont`
            target = torch.tensor(cont, dtype=torch.long, device=rows.device)
            logp = torch.log_softmax(rows, dim=-1).gather(1, target[:, None])[:, 0]
            nll = -logp.mean().item()
            top1 = (rows.argmax(dim=-1) == target).float().mean().item()
        return ScoreResult(tokens=len(cont), nll=nll, top1=top1, prompt_tokens=len(ids), cached_tokens=keep,
                           prefill_tokens=len(ids) - keep, ttft_s=ttft)

    def close(self) -> None:
        """Release what the model holds besides memory: a tensor-parallel engine's worker processes and
        process group. Nothing for a single-process model; the engine is unusable after it with tensor parallel."""
        close = getattr(self.model, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TokenizerMissing(f"{self.source} has no tokenizer (tokenizer.json); give token ids instead")
        return self.tokenizer
