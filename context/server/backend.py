"""The engine the server generates on: a `BatchEngine` (concurrent requests decoded together), or the plain `Engine`
with one lock around each generation (requests then take turns; `--no-batch`). Either way the server calls the same API
(`generate(ids, params, slot=...)`, `new_slot`, `prefill`, `window`, `require_tokenizer()`), from worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any


class LockedGeneration:
    """A Generation that holds the engine's lock from its first token to its end (or `close()`)."""

    def __init__(self, lock: threading.Lock, start: Any) -> None:
        self._lock = lock
        self._start = start
        self._gen: Any = None
        self._held = False

    @property
    def stats(self) -> Any:
        return self._gen.stats if self._gen is not None else None

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._gen is None:
            self._lock.acquire()
            self._held = True
            try:
                self._gen = self._start()
            except BaseException:
                self._release()
                raise
        try:
            return next(self._gen)
        except BaseException:
            self._release()
            raise

    def close(self) -> None:
        try:
            if self._gen is not None:
                self._gen.close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()


class LockedEngine:
    """`engine` (a chatcore Engine) safe to call from many threads: one generation, prefill or score at a time."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:   # window, config, tokenizer, eos_token_ids, source, ...
        return getattr(self.engine, name)

    def generate(self, ids: Any, params: Any = None, *, slot: Any = None, sink_tokens: int | None = None) -> Any:
        return LockedGeneration(self._lock, lambda: self.engine.generate(ids, params, slot=slot,
                                                                          sink_tokens=sink_tokens))

    def prefill(self, ids: Any, slot: Any, **kw: Any) -> Any:
        with self._lock:
            return self.engine.prefill(ids, slot, **kw)

    def score(self, *args: Any, **kw: Any) -> Any:
        with self._lock:
            return self.engine.score(*args, **kw)

    def logits(self, ids: Any) -> Any:
        with self._lock:
            return self.engine.logits(ids)

    def close(self) -> None:
        self.engine.close()


def serving_engine(engine: Any, *, batch: bool = True, max_batch: int = 32, kv_memory: int | None = None) -> Any:
    """What the server generates on: a BatchEngine (concurrent generations decoded together, `max_batch` at most;
    `kv_memory` bytes of paged KV memory, None: its default), or with `batch=False` the engine itself behind one
    lock (generations one at a time)."""
    if not batch:
        return LockedEngine(engine)
    from chatcore.batch.engine import BatchConfig, BatchEngine

    return BatchEngine(engine, BatchConfig(max_batch=max_batch, kv_memory=kv_memory))
