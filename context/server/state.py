"""What every request shares: the engine, the store, the KV slots, live sessions and which are busy."""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import SessionBusy
from ..layout import ContextConfig
from ..session import ChatSession
from ..slots import SlotPool
from .errors import APIError, not_found
from .logprobs import TokenTexts


@dataclass(frozen=True)
class ServerConfig:
    """model_name: the id /v1/models lists and requests name (None: any name is accepted as it).
    api_key: the Bearer token every /v1 request must carry (None: no auth). context: the policy of
    `truncation: "auto"` turns. max_n: the most choices one chat completion may ask for. slot_memory: bytes
    of KV slots kept between turns (least recently used freed first; None: no bound). max_sessions: live
    sessions kept in memory (their history is always re-read from storage)."""

    model_name: str = "chatcore"
    api_key: str | None = None
    context: ContextConfig = ContextConfig()
    max_n: int = 16
    slot_memory: int | None = 4 << 30
    max_sessions: int = 256

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("the served model name must not be empty")
        if self.max_n < 1 or self.max_sessions < 1:
            raise ValueError("max_n and max_sessions must be >= 1")

    @property
    def strict_context(self) -> ContextConfig:
        """The policy of `truncation: "disabled"`: the whole history or an error (nothing pruned, no summary,
        the window all the prompt's but one token)."""
        return dataclasses.replace(self.context, reply_reserve=1, high_watermark=1.0, low_watermark=1.0,
                                   summarize=False)


class SharedSlotPool(SlotPool):
    """A SlotPool that many request threads use at once."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._lock = threading.RLock()

    def get(self, key: Hashable, capacity: int) -> Any:
        with self._lock:
            return super().get(key, capacity)

    def discard(self, key: Hashable) -> None:
        with self._lock:
            super().discard(key)

    def trim(self, keep: Hashable | None = None) -> list[Hashable]:
        with self._lock:
            return super().trim(keep)


class ServerState:
    def __init__(self, engine: Any, store: Any, config: ServerConfig | None = None) -> None:
        self.engine = engine
        self.store = store
        self.config = config or ServerConfig()
        self.tokenizer = engine.require_tokenizer()
        self.token_texts = TokenTexts(self.tokenizer)   # token id -> text for logprobs
        self.pool = SharedSlotPool(engine.new_slot, self.config.slot_memory)
        self._sessions: OrderedDict[tuple[str, str], ChatSession] = OrderedDict()
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    # -- names -----------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> str:
        """The served model's name; a 404 in OpenAI's shape for any other."""
        if name is None or name == self.config.model_name:
            return self.config.model_name
        raise not_found(f"the model {name!r} does not exist; this server serves {self.config.model_name!r}",
                        "model", "model_not_found")

    # -- one request per session at a time ------------------------------------------------------------------
    @contextmanager
    def busy(self, session_id: str) -> Iterator[None]:
        """Hold `session_id` for one request; a second one meanwhile gets a 409."""
        with self._lock:
            if session_id in self._busy:
                raise APIError(409, str(SessionBusy("a reply is still streaming in this conversation; wait for it "
                                                    "to finish (or cancel it) and retry")),
                               code="conversation_busy")
            self._busy.add(session_id)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(session_id)

    # -- live sessions ---------------------------------------------------------------------------------------
    def session(self, conv: Any, thread: list[Any], strict: bool,
                tools: list[dict[str, Any]] | None = None) -> ChatSession:
        """A ChatSession on `conv` (a storage.Conversation) whose current thread is `thread`: the one kept
        from this session's last turn when it holds exactly that thread, pins and summary (its context
        plan, and so the kept KV prefix, stay stable from turn to turn), else a new one. Its chat template renders
        `tools` (this request's). Call under busy()."""
        record = conv.session
        key = (record.id, "strict" if strict else "auto")
        with self._lock:
            live = self._sessions.pop(key, None)
        if live is not None and not (
                [m.id for m in live.manager.thread] == [m.id for m in thread]
                and tuple(live.manager.pinned) == tuple(record.pinned)
                and live._record.summary == record.summary):
            live.close()
            live = None
        if live is None:
            cfg = self.config.strict_context if strict else self.config.context
            live = ChatSession(self.engine, self.store, record, thread, config=cfg, pool=self.pool, tools=tools)
        live.set_tools(tools)
        live._record = record
        with self._lock:
            self._sessions[key] = live
            doomed = []
            while len(self._sessions) > self.config.max_sessions:
                doomed.append(self._sessions.popitem(last=False)[1])
        for s in doomed:
            s.close()
        return live

    def forget(self, session_id: str) -> None:
        """Drop what is kept in memory of a session (it was deleted)."""
        with self._lock:
            gone = [self._sessions.pop(k) for k in list(self._sessions) if k[0] == session_id]
        for s in gone:
            s.close()
        self.pool.discard(session_id)

    def close(self) -> None:
        with self._lock:
            live = list(self._sessions.values())
            self._sessions.clear()
        for s in live:
            s.close()
