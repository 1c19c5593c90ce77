"""Plain, frozen dataclasses: what the store hands out. No Redis types ever leave `storage`."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from . import tree

Role = Literal["system", "user", "assistant", "tool"]
Status = Literal["complete", "streaming", "incomplete", "cancelled"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
STATUSES: tuple[str, ...] = ("complete", "streaming", "incomplete", "cancelled")
#: Statuses a finished reply may end with.
FINAL_STATUSES: tuple[str, ...] = ("complete", "incomplete", "cancelled")


@dataclass(frozen=True)
class Message:
    """One message. `parent_id` links edits and regenerations as siblings (never overwrites).

    `status` is the effective status: a reply whose writer died (or stopped sending heartbeats)
    reads as "incomplete". `seq` is the message's position in the order messages were added to the
    session (0-based; relative order is all it promises). `extra` holds OpenAI-style fields such
    as `name`, `tool_calls`, `tool_call_id`; treat it as read-only.
    """

    id: str
    session_id: str
    role: Role
    content: str
    parent_id: str | None
    status: Status
    created_at: float
    updated_at: float
    tokens: int | None = None
    seq: int = -1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Summary:
    """A summary of pruned context, covering the thread from `first_id` to `last_id` inclusive."""

    text: str
    first_id: str
    last_id: str
    tokens: int | None = None
    created_at: float = 0.0


@dataclass(frozen=True)
class Session:
    """A session's record (settings and bookkeeping), without its messages.

    `sampling` is a plain JSON object (temperature, top_p, seed, ...): treat it as read-only and
    pass a new dict to `Store.update_session`. `tip_id` is the last message of the current branch.
    """

    id: str
    title: str
    created_at: float
    updated_at: float
    model: str | None = None
    system_prompt: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    pinned: tuple[str, ...] = ()
    summary: Summary | None = None
    tags: tuple[str, ...] = ()
    tip_id: str | None = None
    message_count: int = 0
    schema: int = 1


@dataclass(frozen=True)
class Conversation:
    """A session with every message it holds (all branches), in the order they were added."""

    session: Session
    messages: tuple[Message, ...]

    @cached_property
    def by_id(self) -> dict[str, Message]:
        return {m.id: m for m in self.messages}

    @cached_property
    def _children(self) -> dict[str | None, list[str]]:
        return tree.children_index((m.id, m.parent_id) for m in self.messages)

    @cached_property
    def _parents(self) -> dict[str, str | None]:
        return {m.id: m.parent_id for m in self.messages}

    def thread(self, tip_id: str | None = None) -> list[Message]:
        """Messages from the root to `tip_id` (default: the session's current tip), in order."""
        tip = self.session.tip_id if tip_id is None else tip_id
        by_id = self.by_id
        return [by_id[i] for i in tree.path_to(self._parents, tip)]

    def children(self, message_id: str | None) -> list[Message]:
        """Direct replies / continuations of `message_id` (None: the roots), oldest first."""
        return [self.by_id[i] for i in self._children.get(message_id, [])]

    def siblings(self, message_id: str) -> list[Message]:
        """`message_id` and its alternatives (edits / regenerations), oldest first."""
        return self.children(self.by_id[message_id].parent_id)

    def latest_leaf(self, message_id: str | None) -> str | None:
        """The tip you reach from `message_id` by always taking the most recently added child."""
        return tree.latest_leaf(self._children, message_id)


@dataclass(frozen=True)
class SessionPage:
    """One page of sessions, most recently active first.

    `errors` holds one exception per session that could not be read (corrupt, newer schema); the
    rest of the page still loads. `total` counts every session in the index.
    """

    sessions: tuple[Session, ...]
    errors: tuple[Exception, ...]
    total: int
    offset: int
    next_offset: int | None


@dataclass(frozen=True)
class SearchHit:
    """A search match: in the title / tags (`message_id` None) or in a message's content."""

    session: Session
    message_id: str | None
    snippet: str
