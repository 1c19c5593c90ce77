"""The context manager and the session API: what the model sees each turn, explained.

    from context import ChatSession
    s = ChatSession.create(engine, store, system="You are terse.")
    for ev in s.send("Hello"):
        print(ev.text, end="")
    print(ev.report)

Budgeting, placement and pruning (`TokenBudget`, `ContextManager`, `TurnIndex`, `plan_kv`) work on
plain lists of ints and plain objects; only the engine touches tensors.
"""

from .budget import TokenBudget
from .errors import ContextError, ContextOverflow, MessageTooLong, SessionBusy, SessionDeleted
from .layout import REGIONS, ContextConfig, Layout
from .library import SessionLibrary, load_engine
from .manager import ContextManager, Pending, SummaryState
from .outbox import Outbox, SaveEvent
from .plan import KVPlan, Plan, plan_kv
from .pruning import Turn, TurnIndex
from .report import TurnReport
from .session import ChatEvent, ChatMessage, ChatSession
from .sinks import stream_with_sinks
from .slots import SlotPool
from .summarize import SummaryResult

__all__ = [
    "REGIONS", "ChatEvent", "ChatMessage", "ChatSession", "ContextConfig", "ContextError", "ContextManager",
    "ContextOverflow", "KVPlan", "Layout", "MessageTooLong", "Outbox", "Pending", "Plan", "SaveEvent", "SessionBusy",
    "SessionDeleted", "SlotPool",
    "SummaryResult", "SummaryState", "TokenBudget", "Turn", "TurnIndex", "TurnReport", "plan_kv",
    "stream_with_sinks",
]
__all__ += ["SessionLibrary", "load_engine", "NotFound", "StorageError", "StoreUnavailable"]


def __getattr__(name: str) -> type[Exception]:
    """storage's errors (`NotFound`, `StorageError`, `StoreUnavailable`), imported on first use."""
    from . import errors

    if name in errors.STORAGE_ERRORS:
        return getattr(errors, name)  # type: ignore[no-any-return]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
