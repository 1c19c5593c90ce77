"""`/v1/conversations`: a conversation is a chatcore session (the same id), so one made over HTTP opens in
`chatcore chat` and one made in the TUI continues over HTTP. Its items are the session's current branch.
`metadata` maps onto the session's title only (`metadata.title`); other keys are not kept."""

from __future__ import annotations

from typing import Any

from .errors import bad_request, not_found
from .items import NewItem, input_items, item_list, join_users, output_item, store_items
from .state import ServerState


def _object(session: Any) -> dict[str, Any]:
    return {"id": session.id, "object": "conversation", "created_at": int(session.created_at),
            "metadata": {"title": session.title} if session.title else {}}


def _load(state: ServerState, conversation_id: str) -> Any:
    from storage import InvalidInput, NotFound

    try:
        return state.store.load(conversation_id)
    except (NotFound, InvalidInput):
        raise not_found(f"no conversation {conversation_id!r}", "conversation_id") from None


def _append(state: ServerState, session_id: str, tail: Any, items: list[NewItem]) -> list[Any]:
    join, items = join_users(items, tail)
    return store_items(state.store, session_id, tail, items, join)


def create(state: ServerState, items: list[dict[str, Any]] | None, metadata: dict[str, str] | None) -> dict[str, Any]:
    new = input_items(items, "items") if items else []
    title = (metadata or {}).get("title", "")
    session = state.store.create_session(title, model=state.config.model_name)
    _append(state, session.id, None, new)
    return _object(state.store.get_session(session.id))


def get(state: ServerState, conversation_id: str) -> dict[str, Any]:
    return _object(_load(state, conversation_id).session)


def update(state: ServerState, conversation_id: str, metadata: dict[str, str]) -> dict[str, Any]:
    _load(state, conversation_id)
    return _object(state.store.update_session(conversation_id, title=metadata.get("title", "")))


def delete(state: ServerState, conversation_id: str) -> dict[str, Any]:
    _load(state, conversation_id)
    with state.busy(conversation_id):
        state.store.delete_session(conversation_id)
    state.forget(conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


def list_items(state: ServerState, conversation_id: str, *, limit: int = 20, order: str = "desc",
               after: str | None = None) -> dict[str, Any]:
    if order not in ("asc", "desc"):
        raise bad_request("order must be 'asc' or 'desc'", "order")
    if not 1 <= limit <= 100:
        raise bad_request("limit must be between 1 and 100", "limit")
    thread = _load(state, conversation_id).thread()
    items = [output_item(m) for m in (thread if order == "asc" else reversed(thread))]
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise bad_request(f"after: no item {after!r} in this conversation", "after")
        items = items[ids.index(after) + 1:]
    return item_list(items[:limit], has_more=len(items) > limit)


def add_items(state: ServerState, conversation_id: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    conv = _load(state, conversation_id)
    new = input_items(items, "items")
    with state.busy(conversation_id):
        thread = conv.thread()
        stored = _append(state, conversation_id, thread[-1] if thread else None, new)
    return item_list([output_item(m) for m in stored])


def get_item(state: ServerState, conversation_id: str, item_id: str) -> dict[str, Any]:
    conv = _load(state, conversation_id)
    m = conv.by_id.get(item_id)
    if m is None:
        raise not_found(f"no item {item_id!r} in conversation {conversation_id!r}", "item_id")
    return output_item(m)
