"""`BatchEngine`: many generations on one model at once, a drop-in for :class:`chatcore.Engine` where the context
manager and the server use one (``ChatSession``, ``Turn``, ``stream_with_sinks``).

    batch = BatchEngine(chatcore.load("model.gguf"))
    gen = batch.generate(ids, SamplingParams(max_new_tokens=64), slot=batch.new_slot())   # from any thread
    for ev in gen: ...

Every call may come from its own thread; the generations running at the same time are decoded together, one
batched forward pass per step (:mod:`chatcore.batch.scheduler`), and each one's events and stats are those
:meth:`Engine.generate` gives for it alone.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chatcore.batch import scoring
from chatcore.batch.paged import PagedPool, block_nbytes
from chatcore.batch.paged_runner import PagedRunner
from chatcore.batch.runner import BatchRunner, SerialRunner, Work
from chatcore.batch.scheduler import Failure, Request, Scheduler
from chatcore.engine import Engine
from chatcore.errors import LoadOptionError, PromptTooLong
from chatcore.generation import Generation, ReplyState, ScoreResult, TokenEvent
from chatcore.models.base import CausalLM
from chatcore.prefix import common_prefix, reused_prefix
from chatcore.sampling import SamplingParams
from chatcore.tokenizer import Tokenizer


def _positive_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


@dataclass(frozen=True)
class BatchConfig:
    """How a :class:`BatchEngine` batches.

    ``max_batch``: sequences decoded together at most (more wait their turn); ``block_size``: tokens per KV
    block of the paged memory (a power of two); ``kv_memory``: bytes of KV memory all sequences share (None: a
    fraction of the free GPU memory, a default on the CPU); ``prefill_chunk``: prompt tokens a new sequence
    runs per step (None: the engine's prefill chunk, at most 2048); ``decode_ahead``: while every sequence
    decodes greedily, queue each step on the device before reading the last one's tokens, so the host's work
    for them overlaps the step (None: on a GPU, where that pays; False: each step read before the next; the
    same tokens and events either way).
    """

    max_batch: int = 32
    block_size: int = 256
    kv_memory: int | None = None
    prefill_chunk: int | None = None
    decode_ahead: bool | None = None

    def __post_init__(self) -> None:
        if not _positive_int(self.max_batch):
            raise LoadOptionError(f"BatchConfig.max_batch must be an int >= 1, got {self.max_batch!r}")
        if not (_positive_int(self.block_size) and self.block_size & (self.block_size - 1) == 0):
            raise LoadOptionError(f"BatchConfig.block_size must be a power of two, got {self.block_size!r}")
        if self.kv_memory is not None and not _positive_int(self.kv_memory):
            raise LoadOptionError(f"BatchConfig.kv_memory must be a number of bytes >= 1 or None, "
                                  f"got {self.kv_memory!r}")
        if self.prefill_chunk is not None and not _positive_int(self.prefill_chunk):
            raise LoadOptionError(f"BatchConfig.prefill_chunk must be an int >= 1 or None, got {self.prefill_chunk!r}")
        if self.decode_ahead is not None and not isinstance(self.decode_ahead, bool):
            raise LoadOptionError(f"BatchConfig.decode_ahead must be True, False or None, got {self.decode_ahead!r}")


_DEFAULT_CHUNK = 2048        # prompt tokens per step at most, unless BatchConfig.prefill_chunk says otherwise
_CPU_KV_MEMORY = 512 << 20   # the default KV memory on the CPU, at most (bytes)
_GPU_KV_FRACTION = 0.7       # of the memory free on the GPU when the BatchEngine starts


def kv_memory(engine: Engine, config: BatchConfig) -> int:
    """Bytes of paged KV memory: ``config.kv_memory``, else on a GPU a fraction of what is free (free on the
    device plus what PyTorch's allocator holds unused), on the CPU room for ``max_batch`` full windows up to
    512 MiB."""
    if config.kv_memory is not None:
        return config.kv_memory
    rt, model = engine.runtime, engine.model
    if rt.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(rt.device)
        free += torch.cuda.memory_reserved(rt.device) - torch.cuda.memory_allocated(rt.device)
        return int(free * _GPU_KV_FRACTION)
    per_block = block_nbytes(block_size=config.block_size, **{k: v for k, v in model.slot_args().items()
                                                              if k in ("num_layers", "num_kv_heads", "head_dim",
                                                                       "dtype", "kv_dtype")})
    blocks = config.max_batch * -(-rt.max_seq_len // config.block_size) + 1
    return max(2 * per_block, min(blocks * per_block, _CPU_KV_MEMORY))


def make_runner(engine: Engine, config: BatchConfig) -> BatchRunner:
    """The runner a BatchEngine drives: the paged runner (every sequence in one forward pass over shared KV
    blocks) for a model in one process, the serial one (a forward pass per sequence) for tensor parallel."""
    if not isinstance(engine.model, CausalLM):
        return SerialRunner(engine.model)
    pool = PagedPool.for_model(engine.model, memory=kv_memory(engine, config), block_size=config.block_size)
    return PagedRunner(engine.model, pool)


class BatchSlot:
    """A sequence's KV slot as callers hold it: the verb API of :class:`~chatcore.kv_cache.KVCache`, each change
    made between two steps of the scheduler (which may be running other sequences' steps meanwhile)."""

    def __init__(self, inner: Any, owner: BatchEngine) -> None:
        self.inner = inner
        self._owner = owner

    @property
    def tokens(self) -> list[int]:
        return self.inner.tokens

    @property
    def length(self) -> int:
        return self.inner.length

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def common_prefix(self, ids: Sequence[int]) -> int:
        return common_prefix(self.inner.tokens, ids)

    # A caller plans a KV operation from ``tokens`` read before it takes the step lock; meanwhile the pool may
    # have evicted this idle slot for memory (reset: empty). An operation on tokens an evicted slot no longer
    # holds is then nothing to do: the next generate prefills the whole prompt, as after any eviction.
    def truncate(self, n: int) -> None:
        with self._owner.scheduler.guard():
            if self.inner.length == 0:
                return
            self.inner.truncate(n)

    def drop(self, start: int, end: int) -> None:
        with self._owner.scheduler.guard():
            if self.inner.length == 0:
                return
            self.inner.drop(start, end)

    def reset(self) -> None:
        with self._owner.scheduler.guard():
            self.inner.reset()

    def __getattr__(self, name: str) -> Any:   # the rest (quantized, dtype, blocks, ...) read as they are
        return getattr(self.inner, name)


class BatchEngine:
    """Many generations on one :class:`~chatcore.Engine`'s model at once; thread-safe.

    The Engine API the context manager uses (``window``, ``config``, ``tokenizer``, ``require_tokenizer()``,
    ``eos_token_ids``, ``new_slot``, ``prefill``, ``generate``, ``score``, ``logits``, ``close``), with slots of
    its own (:class:`BatchSlot`; an Engine's slots do not fit it). ``generate`` from several threads at once
    decodes the generations together; ``score``, ``logits`` and ``prefill(all_logits=True)`` take the model to
    themselves between two steps (a prompt's whole prefill). ``close()`` ends what still runs
    (:class:`SchedulerClosed`) and closes the engine.
    """

    def __init__(self, engine: Engine, config: BatchConfig | None = None) -> None:
        self.engine = engine
        self.batch_config = config or BatchConfig()
        self.runner = make_runner(engine, self.batch_config)
        pool = getattr(self.runner, "pool", None)
        self.scheduler = Scheduler(self.runner, max_batch=self.batch_config.max_batch, make_room=engine.make_room,
                                   shift=Engine._shift_size, pin=pool.pinned if pool is not None else None,
                                   ahead=self.batch_config.decode_ahead if self.batch_config.decode_ahead is not None
                                   else engine.runtime.device.type == "cuda")
        self.scheduler.start()

    # -- what the engine is -------------------------------------------------------------------------------
    @property
    def window(self) -> int:
        return self.engine.window

    @property
    def config(self) -> Any:
        """The model's config (as :attr:`Engine.config`); the batching settings are :attr:`batch_config`."""
        return self.engine.config

    @property
    def runtime(self) -> Any:
        return self.engine.runtime

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    @property
    def source(self) -> str:
        return self.engine.source

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.engine.eos_token_ids

    def require_tokenizer(self) -> Tokenizer:
        return self.engine.require_tokenizer()

    def prefill_chunk_size(self) -> int:
        """Prompt tokens a new sequence runs per step: ``BatchConfig.prefill_chunk``, else the engine's chunk
        up to 2048 (a step with a larger chunk holds every running stream back longer)."""
        return self.batch_config.prefill_chunk or min(self.engine.prefill_chunk_size(), _DEFAULT_CHUNK)

    # -- slots --------------------------------------------------------------------------------------------
    def new_slot(self, capacity: int | None = None) -> BatchSlot:
        """A slot to keep between calls (its tokens are reused as a prefix), at most the window long."""
        return BatchSlot(self.runner.new_slot(min(capacity or self.window, self.window)), self)

    def _inner(self, slot: Any) -> Any:
        if not isinstance(slot, BatchSlot) or slot._owner is not self:
            raise ValueError("the slot was not made by this BatchEngine; use its new_slot()")
        return slot.inner

    # -- generation -------------------------------------------------------------------------------------
    def generate(self, ids: Sequence[int], params: SamplingParams | None = None, *, slot: BatchSlot | None = None,
                 sink_tokens: int | None = None) -> Generation:
        """Stream the continuation of ``ids``, as :meth:`Engine.generate` (same events and stats), decoded
        together with every other generation running now. :class:`PromptTooLong` and bad arguments raise here,
        before anything is queued; the prompt is prefilled in the step thread, a chunk per step. Closing the
        stream takes the sequence out at the next step; the slot keeps the prompt and the tokens handed out."""
        params = params or SamplingParams()
        ids = self.engine._check_ids(ids)
        owned = slot is None
        inner = self._inner(slot if slot is not None else self.new_slot())
        if sink_tokens is None and len(ids) > inner.capacity:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens but the context window is {inner.capacity}; "
                                "shorten it or raise the window")
        if sink_tokens is not None:
            Engine._shift_size(inner, sink_tokens)   # a bad sink count raises now
        t0 = time.perf_counter()
        chunk = self.prefill_chunk_size()
        self.scheduler.claim(inner)
        try:
            with self.scheduler.guard():   # between two steps: no step evicts the slot before the request is queued
                keep = reused_prefix(inner.tokens, ids)
                inner.truncate(keep)
                reply = ReplyState(ids, params, keep, t0, 0, vocab_size=self.config.vocab_size,
                                   device=self.runtime.device, tokenizer=self.tokenizer, eos_ids=self.eos_token_ids)
                req = Request(inner, ids[keep:], reply, chunk=chunk, sinks=sink_tokens, owned=owned)
                self.scheduler.submit(req)
        except BaseException:
            self.scheduler.unclaim(inner)
            raise
        return _Stream(reply, req, self.scheduler)

    def prefill(self, ids: Sequence[int], slot: BatchSlot, *, all_logits: bool = False,
                sink_tokens: int | None = None) -> torch.Tensor:
        """Append ``ids`` to the slot (as :meth:`Engine.prefill`); returns the last token's logits [1, vocab].
        Runs a chunk per step beside the running generations; with ``all_logits`` (logits [len(ids), vocab] of
        every token, float32) it takes the model to itself between two steps."""
        inner = self._inner(slot)
        ids = self.engine._check_ids(ids)
        if sink_tokens is None and inner.length + len(ids) > inner.capacity:
            raise PromptTooLong(f"the prompt needs {inner.length + len(ids)} tokens but the context window is "
                                f"{inner.capacity}; shorten it or raise the window")
        if sink_tokens is not None:
            Engine._shift_size(inner, sink_tokens)
        if all_logits:
            return self._alone(inner, lambda: scoring.prefill_all(self.engine, self.runner, inner, ids,
                                                                  self.prefill_chunk_size(), sink_tokens))
        chunk = self.prefill_chunk_size()
        self.scheduler.claim(inner)
        try:
            req = Request(inner, list(ids), None, chunk=chunk, sinks=sink_tokens)
            self.scheduler.submit(req)
        except BaseException:
            self.scheduler.unclaim(inner)
            raise
        item = req.events.get()
        if isinstance(item, Failure):
            raise item.exc
        return item

    def _alone(self, inner: Any, fn: Any) -> Any:
        """``fn()`` in the step thread with the model to itself, the slot claimed meanwhile."""
        self.scheduler.claim(inner)
        try:
            return self.scheduler.call(fn)
        finally:
            self.scheduler.unclaim(inner)

    # -- scoring ------------------------------------------------------------------------------------------
    def score(self, ids: Sequence[int], continuation: Sequence[int], *, slot: BatchSlot | None = None) -> ScoreResult:
        """As :meth:`Engine.score` (with a ``slot``, its matching prefix is reused and it then holds ``ids`` and
        ``continuation``), with the model to itself between two steps."""
        ids = self.engine._check_ids(ids)
        cont = self.engine._check_ids(continuation) if len(continuation) else []
        inner = self._inner(slot) if slot is not None else self.runner.new_slot(self.window)
        if len(ids) + len(cont) > inner.capacity:
            raise PromptTooLong(f"the prompt and continuation need {len(ids) + len(cont)} tokens but the context "
                                f"window is {inner.capacity}; shorten them or raise the window")
        try:
            return self._alone(inner, lambda: scoring.score(self.engine, self.runner, inner, ids, cont,
                                                            self.prefill_chunk_size()))
        finally:
            if slot is None:
                self._alone(inner, lambda: self.runner.release(inner))

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits [len(ids), vocab] (float32, on the CPU), as :meth:`Engine.logits`, with the model to itself."""
        ids = self.engine._check_ids(ids)
        inner = self.runner.new_slot(len(ids))
        try:
            return self._alone(inner, lambda: scoring.prefill_all(self.engine, self.runner, inner, ids,
                                                                  self.prefill_chunk_size()).cpu())
        finally:
            self._alone(inner, lambda: self.runner.release(inner))

    def run(self, works: Sequence[Work]) -> torch.Tensor:
        """One batched forward pass by hand, between two steps (for checks and benchmarks)."""
        return self.scheduler.call(lambda: self.runner.run(works))

    # -- the end ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the step thread (running and waiting generations end with :class:`SchedulerClosed`), then close
        the engine (a tensor-parallel one's worker processes)."""
        self.scheduler.close()
        self.engine.close()

    def __enter__(self) -> BatchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Stream(Generation):
    """A generation fed by the scheduler: iterating it reads the request's queue (in the caller's thread);
    closing it takes the sequence out of the batch and cuts its slot back to what was handed out."""

    def __init__(self, reply: ReplyState, req: Request, scheduler: Scheduler) -> None:
        super().__init__(reply, _pull(req, reply, scheduler))
        self._req, self._scheduler = req, scheduler
        # the event stream dropped unfinished without close() (perhaps never started): the sequence leaves the
        # batch at the next step, with no waiting (a finalizer may run in any thread)
        weakref.finalize(self._events, _dropped, req)

    def close(self) -> None:
        _stop(self._req, self._reply, self._scheduler)
        self._events.close()


def _pull(req: Request, reply: ReplyState, scheduler: Scheduler) -> Iterator[TokenEvent]:
    try:
        while True:
            item = req.events.get()
            if isinstance(item, Failure):
                req.ended = True
                raise item.exc
            if item.finish_reason is not None:
                req.ended = True
                yield item
                return
            req.delivered += 1
            yield item
    except GeneratorExit:
        _stop(req, reply, scheduler)
        raise


def _dropped(req: Request) -> None:
    if not req.ended:
        req.cancelled = True


def _stop(req: Request, reply: ReplyState, scheduler: Scheduler) -> None:
    """The consumer ends the stream before its last event: stats "cancelled" counting the tokens it was given."""
    if req.ended:
        return
    req.ended = True
    scheduler.cancel(req)
    reply.n = req.delivered
    reply.cancelled()
