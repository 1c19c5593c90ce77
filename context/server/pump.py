"""Run a blocking iterator (a reply's token stream) in its own thread and read it from asyncio.

    pump = Pump(lambda: session.regenerate(), loop)
    async for item in pump:          # raises what the iterator raised
        ...
    pump.stop()                      # the client went away: the iterator is closed after its current item

The thread owns the iterator from start to end: it is created, iterated and closed there (a ChatSession's
reply stream stores the partial reply as cancelled when it is closed early).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Pump:
    def __init__(self, make: Callable[[], Iterator[Any]], loop: asyncio.AbstractEventLoop, tag: Any = None,
                 queue: asyncio.Queue[Any] | None = None) -> None:
        """Start `make()` in a thread now; its items go to `queue` (a new one unless given: several pumps may
        share one, each item then arrives as `(tag, item)`)."""
        self._make = make
        self._loop = loop
        self.tag = tag
        self._shared = queue is not None
        self.queue: asyncio.Queue[Any] = queue if queue is not None else asyncio.Queue()
        self._stop = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chatcore-serve-reply", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the iterator after the item it is producing now (safe from any thread; idempotent)."""
        self._stop.set()

    def _put(self, item: Any) -> None:
        out = (self.tag, item) if self._shared else item
        with contextlib.suppress(RuntimeError):   # the loop is closed (shutting down): nobody reads any more
            self._loop.call_soon_threadsafe(self.queue.put_nowait, out)

    def _run(self) -> None:
        try:
            it = iter(self._make())
            try:
                for item in it:
                    self._put(item)
                    if self._stop.is_set():
                        break
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
            self._put(_Failed(exc))
        finally:
            self.done.set()
            self._put(_END)

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            item = await self.queue.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item


async def merged(pumps: list[Pump], queue: asyncio.Queue[Any]) -> AsyncIterator[tuple[Any, Any]]:
    """(tag, item) from pumps sharing `queue`, in arrival order, until every pump has ended; a pump's failure
    is raised when it arrives."""
    left = len(pumps)
    while left:
        tag, item = await queue.get()
        if item is _END:
            left -= 1
            continue
        if isinstance(item, _Failed):
            raise item.exc
        yield tag, item
