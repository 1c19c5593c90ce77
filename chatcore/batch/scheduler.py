"""Continuous batching: one thread steps every running sequence together; requests come from any thread.

Each :meth:`Scheduler.step` is one :meth:`BatchRunner.run <chatcore.batch.runner.BatchRunner.run>`: the decode
token of every running sequence plus at most one prompt chunk of the oldest sequence still prefilling, so a long
prompt holds the others back by one chunk per step, never by its whole prefill. A sequence's tokens are chosen
by its own :class:`~chatcore.generation.ReplyState` (sampler, stop strings, detokenizer), exactly as
:meth:`chatcore.Engine.generate`'s decode loop does: the same events, in the same order, with the same stats.

Events reach the consumer through a queue (:class:`Request.events`); an event is queued once the step that
consumed its token has run (as the engine yields it). A consumer that stops (:meth:`Scheduler.cancel`) gets its
sequence out of the batch at the next step, and its slot cut back to the prompt and the tokens it was handed.
When the runner runs out of KV memory (``OutOfBlocks``), the newest running sequence gives its memory back and
waits at the head of the queue; it is prefilled again (prompt and tokens so far) when memory frees up.

While every running sequence decodes a plain greedy reply, each step is queued on the device before the last
one's tokens are read, and the host's work for those tokens overlaps the step (:mod:`chatcore.batch.ahead`);
the events and the slots come out as the step-by-step loop leaves them.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

import torch

from chatcore.batch.ahead import InFlight, TokenFetch
from chatcore.batch.runner import BatchRunner, Work
from chatcore.errors import ChatcoreError, OutOfBlocks
from chatcore.generation import ReplyState, TokenEvent
from chatcore.sampling import TopLogprobs


class SchedulerClosed(ChatcoreError):
    """The batch engine was closed: it takes no more requests, and what was still running ended with this."""


class Failure:
    """What a consumer's queue gets instead of an event when its sequence failed: the exception to raise."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_ORDER = itertools.count()
_LET_IN_S = 0.05   # the longest the step thread waits after a step for other threads to take its lock


class StepLock:
    """The scheduler's reentrant lock, fair to the threads that wait for it: the step thread takes it for every
    step and would take it again at once (a plain lock lets the releasing thread win, so a request could wait
    seconds to be queued); after each step it lets every thread already waiting take it first (:meth:`let_in`)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(threading.Lock())
        self._waiting = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        if not blocking:
            return False
        with self._cond:
            self._waiting += 1
        try:
            return self._lock.acquire(True, timeout)
        finally:
            with self._cond:
                self._waiting -= 1
                self._cond.notify_all()

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def let_in(self, timeout: float = _LET_IN_S) -> None:
        """Wait (not holding the lock) until no other thread is waiting for it, at most ``timeout`` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: self._waiting == 0, timeout)


class Request:
    """One sequence: its runner slot, the tokens still to run through it (``todo``), its reply state (None: a
    prefill alone, whose queue gets the last token's logits [1, vocab]) and its consumer's queue.

    ``chunk``: prompt tokens per step; ``sinks``: the slot shifts its oldest non-sink tokens out when full
    (``make_room``) instead of ending the reply; ``owned``: the slot is the request's own (released at the end).
    """

    def __init__(self, slot: Any, todo: list[int], reply: ReplyState | None, *, chunk: int,
                 sinks: int | None = None, owned: bool = False) -> None:
        if chunk < 1:
            raise ValueError(f"the prefill chunk must be >= 1, got {chunk}")
        self.slot, self.todo, self.reply = slot, todo, reply
        self.chunk, self.sinks, self.owned = chunk, sinks, owned
        self.order = next(_ORDER)          # arrival: older sequences keep their memory, newer ones wait
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.done = threading.Event()      # set once the scheduler has let go of it
        self.cancelled = False             # the consumer stopped (set from its thread)
        self.ended = False                 # the consumer's side is over (last event, failure or cancel)
        self.delivered = 0                 # tokens the consumer was handed (its thread)
        self.fed = 0                       # generated tokens put into the sequence (slot or todo)
        self.decoding = False              # todo is one generated token (else: prompt, or a preempted re-prefill)
        self.prefilled = False
        # the fed token's event (token, text, logprob, top logprobs, stopped), sent once its step ran
        self.pending: tuple[int, str, float | None, TopLogprobs | None, bool] | None = None


class Scheduler:
    """Steps every admitted sequence together, at most ``max_batch`` at once (the rest wait, first come first
    served). ``make_room(slot, need, sinks)`` is :meth:`chatcore.Engine.make_room`; ``shift(slot, sinks)`` the
    tokens one shift frees (a sink-window prompt goes in chunks no larger). ``pin(slots)``: a context in which
    the runner's memory never evicts those slots to make room (the paged pool's ``pinned``); every live
    request's slot is pinned through a step, so a waiting sequence keeps the prefix its prompt counts on.

    ``ahead``: greedy decode steps are queued before the last one is read, where the runner can
    (``greedy_step``); False: every step is read before the next (the reference the other equals).

    Threaded (:meth:`start`) or stepped by hand (:meth:`step`, for tests). ``lock`` is held through each step:
    whoever changes a slot from another thread takes it (the engine's slot handles do); requests submitted while
    holding it all join the next step (the lock before the queue's condition, always in this order).
    """

    def __init__(self, runner: BatchRunner, *, max_batch: int, make_room: Callable[[Any, int, int], int],
                 shift: Callable[[Any, int], int],
                 pin: Callable[[Iterable[Any]], contextlib.AbstractContextManager[Any]] | None = None,
                 ahead: bool = True) -> None:
        self.runner = runner
        self._greedy: Any = runner if ahead and hasattr(runner, "greedy_step") else None
        self._inflight: InFlight | None = None   # the greedy step queued ahead, not read yet
        self._fetch: TokenFetch | None = None
        self.ahead_steps = 0               # steps queued before the last one was read
        self.wasted_rows = 0               # rows of those steps whose sequence ended on the token read after
        self.pin = pin or (lambda slots: contextlib.nullcontext())
        self.max_batch = max_batch
        self.make_room, self.shift = make_room, shift
        self.lock = StepLock()
        self.steps = 0                     # batched forward passes run
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._tasks: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._claimed: set[int] = set()    # id() of the slots of live requests
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- from any thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="chatcore-batch", daemon=True)
        self._thread.start()

    def claim(self, slot: Any) -> None:
        """Mark a slot as in use by a request about to be submitted (ValueError when it already is)."""
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the batch engine is closed; make a new one")
            if id(slot) in self._claimed:
                raise ValueError("this slot is in use by a generation that has not ended; finish or close it first")
            self._claimed.add(id(slot))

    def unclaim(self, slot: Any) -> None:
        with self._cond:
            self._claimed.discard(id(slot))

    def submit(self, req: Request) -> None:
        """Queue a request whose slot was claimed; its events arrive on ``req.events``."""
        with self._cond:
            if self._closed:
                self._claimed.discard(id(req.slot))
                raise SchedulerClosed("the batch engine is closed; make a new one")
            self._inbox.append(req)
            self._cond.notify()

    def cancel(self, req: Request) -> None:
        """The consumer stops: wait until the sequence is out of the batch (at most one step), then cut its slot
        back to the prompt and the tokens handed out."""
        with self._cond:
            req.cancelled = True
            self._cond.notify()
        if threading.current_thread() is self._thread:   # a stream collected in the step thread: no waiting
            return
        if self._thread is None:   # stepped by hand: out of the batch now
            with self.lock:
                if not req.done.is_set():
                    self._remove(req)
                    self._let_go(req)
        req.done.wait()
        with self.lock:
            extra = req.fed - req.delivered      # generated tokens in the sequence the consumer never saw
            cut = min(extra, len(req.todo))
            del req.todo[len(req.todo) - cut:]
            extra -= cut
            if extra > 0 and not req.owned:
                req.slot.truncate(max(0, req.slot.length - extra))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the step thread between two steps (the model to itself meanwhile); return its result."""
        if threading.current_thread() is self._thread or self._thread is None:
            with self.lock:
                return fn()
        fut: Future[Any] = Future()
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the batch engine is closed; make a new one")
            self._tasks.append((fn, fut))
            self._cond.notify()
        return fut.result()

    def close(self) -> None:
        """Stop the step thread; whatever still runs or waits ends with :class:`SchedulerClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._shutdown(SchedulerClosed("the batch engine was closed while this was running"))

    @property
    def active(self) -> int:
        """Sequences admitted to the batch now."""
        return len(self._running)

    # -- the step thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._closed or self._inbox or self._tasks or self._running or self._waiting):
                        self._cond.wait()
                    if self._closed:
                        return
                self.step()
                self.lock.let_in()
        except BaseException as exc:   # a bug here must not leave consumers waiting forever
            self._shutdown(exc)
            raise

    def _shutdown(self, exc: BaseException) -> None:
        with self._cond:
            self._closed = True
            reqs = [*self._running, *self._waiting, *self._inbox]
            tasks = self._tasks
            self._running, self._waiting, self._inbox, self._tasks = [], deque(), [], []
            self._inflight = None
        for r in reqs:
            self._fail(r, exc)
        for _, fut in tasks:
            fut.set_exception(exc)

    def step(self) -> bool:
        """Take new requests and calls, then one batched forward pass; returns whether one ran."""
        with self.guard():
            with self._cond:
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                tasks, self._tasks = self._tasks, []
                gone = [r for r in (*self._running, *self._waiting) if r.cancelled]
            if tasks:   # a call sees every slot as the step-by-step loop leaves it
                self._drain()
            for fn, fut in tasks:
                try:
                    fut.set_result(fn())
                except BaseException as exc:   # the caller gets it
                    fut.set_exception(exc)
            for r in gone:
                self._remove(r)
                self._let_go(r)
                r.events.put(Failure(SchedulerClosed("this stream was closed")))   # a reader never hangs on it
            self._admit()
            return self._forward()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Between two steps (the lock), every live request's slot kept from eviction (pinned): where slots
        change, in the step and from other threads (a slot's drop may take a block, which may evict)."""
        with self.lock:
            with self._cond:
                live = [r.slot for r in (*self._running, *self._waiting, *self._inbox)]
            with self.pin(live):
                yield

    def _admit(self) -> None:
        """One sequence prefills at a time; it joins while the batch has room."""
        if self._waiting and len(self._running) < self.max_batch and all(r.decoding for r in self._running):
            self._running.append(self._waiting.popleft())

    def _forward(self) -> bool:
        if self._forward_ahead():
            return True
        self._drain()
        reqs = [r for r in self._running if r.decoding]
        works = [Work(r.slot, r.todo) for r in reqs]
        pre = next((r for r in self._running if not r.decoding), None)
        if pre is not None:
            try:
                works.append(self._chunk(pre))
                reqs.append(pre)
            except Exception as exc:
                self._fail(pre, exc)
        works, reqs = self._reserve(works, reqs)
        if not works:
            return False
        try:
            logits = self.runner.run(works)
        except Exception as exc:
            for r in reqs:
                self._fail(r, exc)
            return True
        self.steps += 1
        ready: list[tuple[int, Request]] = []
        for i, (w, r) in enumerate(zip(works, reqs, strict=True)):
            del r.todo[: len(w.ids)]
            if not r.todo:
                ready.append((i, r))
        # The tokens this step fed are in their slots now: their events go out while the device still computes
        # the step (nothing below this loop's first read of the logits waits on it).
        ready = [(i, r) for i, r in ready if self._hand_out(r)]
        fast = [i for i, r in ready if r.reply is not None and _plain_greedy(r.reply)]
        picked: dict[int, int] = {}
        if fast:   # one argmax and one transfer for every plain greedy row
            rows = logits if len(fast) == logits.shape[0] else logits[fast]
            picked = dict(zip(fast, rows.argmax(dim=-1).tolist(), strict=True))
        for i, r in ready:
            try:
                token = picked.get(i)
                self._advance(r, logits[i] if token is None else None, token)
            except Exception as exc:
                self._fail(r, exc)
        return True

    # -- greedy steps queued ahead (chatcore.batch.ahead) ----------------------------------------------------
    def _ahead_rows(self) -> list[Request] | None:
        """The sequences of a greedy step to queue now, or None: the next step goes the usual way. Every running
        sequence must decode a plain greedy reply (no sink window) and nobody wait for a place in the batch.
        With a step in flight, its sequences go on unless they end after it in a way known now (a stop string
        on the token it fed, the token limit, a full window); an end token is only seen once read."""
        if self._greedy is None or not self._running or (self._waiting and len(self._running) < self.max_batch):
            return None
        fl = self._inflight
        for r in self._running:
            reply = r.reply
            if not (r.decoding and reply is not None and r.sinks is None and _plain_greedy(reply)
                    and len(r.todo) == (0 if fl is not None else 1)):
                return None
        if fl is None:
            return list(self._running)
        return [r for r in self._running
                if not (r.pending is not None and r.pending[4]) and r.reply is not None
                and r.reply.n + 1 < r.reply.limit and r.slot.length < r.slot.capacity]

    def _forward_ahead(self) -> bool:
        """Queue a greedy step (tokens from the host for the first, from the step in flight after), then read the
        step in flight and do its host work while the new one runs. False: it does not apply now (or memory for
        it ran out); the caller drains and steps the usual way."""
        rows = self._ahead_rows()
        if not rows:
            return False
        try:
            for r in rows:
                r.slot.reserve(1)
        except Exception:   # out of KV memory (or worse): the usual step handles it, sequence by sequence
            return False
        fl = self._inflight
        slots = [r.slot for r in rows]
        try:
            ids = self._greedy.greedy_step(slots, [r.todo[0] for r in rows] if fl is None else fl.next_tokens(rows))
        except Exception as exc:
            self._inflight = None
            for r in {id(x): x for x in [*rows, *(fl.reqs if fl is not None else [])]}.values():
                if r in self._running:
                    self._fail(r, exc)
            return True
        self.steps += 1
        self.ahead_steps += 1
        if fl is None:   # the fed tokens were known: in the slots now, as the runner's run commits them
            for r in rows:
                r.slot.commit(r.todo)
                r.todo = []
        self._fetch = self._fetch or TokenFetch(ids.device)
        self._inflight = InFlight(rows, ids, self._fetch.start(ids))
        if fl is not None:
            self._land(fl, {id(r) for r in rows})
        return True

    def _drain(self) -> None:
        """Read the step in flight, if any: its sequences are left as after a usual step (next token in todo)."""
        fl, self._inflight = self._inflight, None
        if fl is not None:
            self._land(fl, set())

    def _land(self, fl: InFlight, queued: set[int]) -> None:
        """Step ``fl`` ran: hand out the tokens it fed and take the tokens it chose, as a usual step does. A
        sequence in the step queued since (``queued``: id()s) already feeds its token there: committed now; one
        that ended on it wasted that row (nothing committed)."""
        tokens = fl.fetched.tokens()
        live = {id(r) for r in self._running}
        for r, token in zip(fl.reqs, tokens, strict=True):
            if id(r) not in live:
                continue
            try:
                if self._hand_out(r):
                    self._advance(r, None, token)
            except Exception as exc:
                self._fail(r, exc)
            if id(r) in queued:
                if r.todo and not r.done.is_set():
                    r.slot.commit(r.todo)
                    r.todo = []
                else:
                    self.wasted_rows += 1

    def _chunk(self, r: Request) -> Work:
        """The next prompt chunk (room made first in a sink window; blocks another sequence registered for its
        leading tokens shared rather than computed, where the runner's slots share)."""
        size = r.chunk if r.sinks is None else min(r.chunk, self.shift(r.slot, r.sinks))
        piece = r.todo[:size]
        if r.sinks is not None:
            dropped = self.make_room(r.slot, len(piece), r.sinks)
            if r.reply is not None:
                r.reply.discarded += dropped
        share = getattr(r.slot, "share_prefix", None)
        if share is not None:
            k = share(piece)   # committed to the slot; it leaves at least the chunk's last token to run
            del r.todo[:k], piece[:k]
        return Work(r.slot, piece)

    def _reserve(self, works: list[Work], reqs: list[Request]) -> tuple[list[Work], list[Request]]:
        """Take the KV memory each work needs, in order (decodes by age, the prompt chunk last). Out of memory: a
        prompt chunk waits for a later step; a decode step makes the newest sequence of the step (the prefilling
        one included) give its memory back and wait."""
        out_w: list[Work] = []
        out_r: list[Request] = []
        todo = list(zip(works, reqs, strict=True))
        while todo:
            w, r = todo.pop(0)
            try:
                r.slot.reserve(len(w.ids))
            except OutOfBlocks as exc:
                if not r.decoding:   # a prompt chunk (the last work) waits for memory a later step frees
                    if not any(x.decoding for x in out_r):
                        self._fail(r, exc)   # nothing else runs: no step would free any
                    continue
                victim = max([*(x for _, x in todo), *out_r, r], key=lambda x: x.order)
                self._preempt(victim)
                if victim in out_r:
                    k = out_r.index(victim)
                    del out_r[k], out_w[k]
                todo = [(ww, rr) for ww, rr in todo if rr is not victim]
                if victim is not r:
                    todo.insert(0, (w, r))
                continue
            except Exception as exc:
                self._fail(r, exc)
                continue
            out_w.append(w)
            out_r.append(r)
        return out_w, out_r

    def _preempt(self, r: Request) -> None:
        """Give the sequence's memory back; it waits first in line, to be prefilled again as it was."""
        r.todo = [*r.slot.tokens, *r.todo]
        r.slot.reset()
        r.decoding = False
        self._running.remove(r)
        self._waiting.appendleft(r)

    def _hand_out(self, r: Request) -> bool:
        """The sequence's todo has run: send the fed token's event (the order of Engine's decode loop: a token's
        event once it is in the slot). Returns whether the sequence goes on to its next token (False: it ended
        here, on a stop string, or failed)."""
        reply = r.reply
        if reply is None or r.pending is None:
            return True
        fed, text, logprob, top, stopped = r.pending
        r.pending = None
        try:
            if stopped:   # a stop string ended the reply on the token just run
                self._finish(r, reply.last(fed, text, logprob, False, True, top))
                return False
            r.events.put(TokenEvent(fed, text, logprob, top_logprobs=top))
        except Exception as exc:
            self._fail(r, exc)
            return False
        return True

    def _advance(self, r: Request, row: torch.Tensor | None, token: int | None) -> None:
        """Choose the next token from ``row`` (the sequence's logits; None when ``token`` was picked already)
        and queue it, or end the reply."""
        reply = r.reply
        if reply is None:
            assert row is not None
            self._finish(r, row[None])
            return
        if not r.prefilled:
            r.prefilled = True
            reply.prefill_s = time.perf_counter() - reply.t0
        logprob = top = None
        if token is None:
            assert row is not None
            token, logprob, top = reply.sampler.sample(row)   # its own top-k when it asks for top_logprobs
        ended, text, stopped = reply.take(token)
        if ended:
            self._finish(r, reply.last(token, text, logprob, True, False, top))
            return
        slot = r.slot
        if not (reply.n < reply.limit and (r.sinks is not None or slot.length < slot.capacity)):
            self._finish(r, reply.last(token, text, logprob, False, stopped, top))
            return
        if slot.length >= slot.capacity:
            reply.discarded += self.make_room(slot, 1, r.sinks)
        r.todo, r.decoding, r.pending = [token], True, (token, text, logprob, top, stopped)
        r.fed += 1

    # -- endings -----------------------------------------------------------------------------------------
    def _remove(self, r: Request) -> None:
        if r in self._running:
            self._running.remove(r)
        elif r in self._waiting:
            self._waiting.remove(r)

    def _let_go(self, r: Request) -> None:
        if r.owned:
            self.runner.release(r.slot)
        self.unclaim(r.slot)
        r.done.set()

    def _finish(self, r: Request, item: Any) -> None:
        self._remove(r)
        self._let_go(r)
        r.events.put(item)

    def _fail(self, r: Request, exc: BaseException) -> None:
        self._remove(r)
        try:
            self._let_go(r)
        finally:
            r.events.put(Failure(exc))


def _plain_greedy(reply: ReplyState) -> bool:
    """The token is the argmax of the raw logits (so one argmax serves every such row of a batch)."""
    p = reply.sampler.params
    return (p.greedy and p.repetition_penalty == 1 and p.presence_penalty == 0 and p.frequency_penalty == 0
            and not p.logprobs)
