"""Sessions in Redis that lose nothing: embedded Redis by default, any Redis by URL.

    store = storage.open_store()                    # or open_store("redis://:pw@host:6379/0")
    s = store.create_session("Trip planning", system_prompt="You are terse.")
    u = store.append_message(s.id, "user", "Where to in May?")
    with store.begin_reply(s.id, parent_id=u.id) as w:
        for piece in pieces:
            w.write(piece)
    store.thread(s.id)                              # root -> tip, in order

Plain data in, plain data out: every result is a frozen dataclass; every error a StorageError.
"""

from .base import StoreConfig
from .connect import client_options, data_dir, embedded_path, open_embedded, open_store, open_url
from .errors import (
                     Conflict,
                     CorruptRecord,
                     InvalidInput,
                     MessageTooLarge,
                     NotFound,
                     SchemaVersionError,
                     StorageError,
                     StoreUnavailable,
)
from .keys import key, new_id, session_keys
from .messages import TIP, NewMessage
from .outbox import Outbox
from .records import Conversation, Message, SearchHit, Session, SessionPage, Summary
from .responses import ResponseRecord, new_response_id
from .sessions import UNSET
from .store import Store
from .urls import redact_url
from .writer import ReplyWriter

__all__ = [
    "TIP", "UNSET", "Conflict", "Conversation", "CorruptRecord", "InvalidInput", "Message",
    "MessageTooLarge", "NewMessage", "NotFound", "Outbox", "ReplyWriter", "ResponseRecord", "SchemaVersionError",
    "SearchHit", "Session", "SessionPage", "StorageError", "Store", "StoreConfig", "StoreUnavailable",
    "Summary", "client_options", "data_dir", "embedded_path", "key", "new_id", "open_embedded", "open_store",
    "new_response_id", "open_url", "redact_url", "session_keys",
]
