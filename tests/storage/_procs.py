"""Child processes for the crash and concurrency tests (run as a script; reaches Redis the way a
user's process does: storage.open_store() with REDIS_URL or CHATCORE_HOME from the environment)."""

from __future__ import annotations

import sys
import time

from storage import StoreConfig, open_store


def stream(session_id: str, parent_id: str) -> None:
    """Stream a reply forever (until killed); say 'ready' once some of it must be saved."""
    store = open_store(config=StoreConfig(checkpoint_tokens=8, keepalive=None))
    writer = store.begin_reply(session_id, parent_id=parent_id, message_id="crash-reply")
    deadline = time.time() + 60
    i = 0
    while time.time() < deadline:
        writer.write(f"tok{i} ")
        i += 1
        if i == 40:
            print("ready", flush=True)
        time.sleep(0.002)


def append(session_id: str, tag: str, count: str) -> None:
    """Append `count` turns (user + reply); replies alternate between streaming and plain appends,
    and some appends are sent twice (a retry must not duplicate). Starts when told "go"."""
    store = open_store()
    store.ping()
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(int(count)):
        u = store.append_message(session_id, "user", f"{tag} asks {i}", message_id=f"{tag}-u{i}")
        if i % 5 == 0:
            again = store.append_message(session_id, "user", f"{tag} asks {i}", message_id=f"{tag}-u{i}")
            assert again.id == u.id
        if i % 2:
            with store.begin_reply(session_id, parent_id=u.id, message_id=f"{tag}-a{i}") as w:
                for part in (f"{tag} ", "answers ", str(i)):
                    w.write(part)
        else:
            store.append_message(session_id, "assistant", f"{tag} answers {i}", parent_id=u.id,
                                 message_id=f"{tag}-a{i}")
    store.close()
    print("done", flush=True)


if __name__ == "__main__":
    {"stream": stream, "append": append}[sys.argv[1]](*sys.argv[2:])
