"""`chatcore sessions list | show ID | export ID | import FILE | delete ID` (also `python -m storage.cli`).

User mistakes print one line to stderr and return a non-zero status; never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from datetime import datetime
from typing import Any, NoReturn, TextIO

from .connect import ENV_URL, open_store
from .errors import InvalidInput, NotFound, StorageError
from .export import decode_text, import_text, to_json_text, to_markdown
from .records import Session
from .store import Store

PROG = "chatcore sessions"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see `{PROG} --help`)")


def _parser() -> argparse.ArgumentParser:
    url = argparse.ArgumentParser(add_help=False)
    url.add_argument("--redis-url", metavar="URL", default=argparse.SUPPRESS,
                     help=f"Redis to use (default: ${ENV_URL}, else the embedded Redis)")
    p = _Parser(prog=PROG, parents=[url], description="List, show, export, import and delete chat sessions.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    ls = sub.add_parser("list", parents=[url], help="sessions, most recently active first")
    ls.add_argument("--format", choices=("table", "json"), default="table")
    ls.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    ls.add_argument("--offset", type=int, default=0, help="skip this many (paging)")
    show = sub.add_parser("show", parents=[url], help="a session's settings and current branch")
    show.add_argument("id", help="session id (a unique prefix is enough)")
    ex = sub.add_parser("export", parents=[url], help="export a session as JSON or Markdown")
    ex.add_argument("id", help="session id (a unique prefix is enough)")
    ex.add_argument("--format", choices=("json", "md"), default="json")
    ex.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    im = sub.add_parser("import", parents=[url],
                        help="import a JSON export, or JSONL of ShareGPT / OpenAI-style records")
    im.add_argument("file", help="file to read ('-' for stdin)")
    rm = sub.add_parser("delete", parents=[url], help="delete a session and all its messages")
    rm.add_argument("id", help="session id (a unique prefix is enough)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        return _fail(str(exc), 2)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if args.command is None:
        return _fail(f"missing command: list, show, export, import or delete (see `{PROG} --help`)", 2)
    store = None
    try:
        store = open_store(getattr(args, "redis_url", None))
        code = _COMMANDS[args.command](store, args, sys.stdout)
        sys.stdout.flush()  # a pipe closed under the last buffered output fails here, not at exit
        return code
    except BrokenPipeError:  # the reader went away (`show ID | head`): stop quietly
        _drop_stdout()
        return 0
    except StorageError as exc:
        return _fail(str(exc), 1)
    except OSError as exc:
        return _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    finally:
        if store is not None:
            store.close()


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the exit's flush does not raise again (storage does not import chatcore,
    whose CLI does the same)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _resolve(store: Store, prefix: str) -> str:
    found = store.match_session_ids(prefix, limit=6)
    if not found:
        raise NotFound("session", prefix, f"see `{PROG} list`")
    if len(found) > 1:
        raise InvalidInput(f"session id {prefix!r} is ambiguous ({', '.join(found[:5])}, ...); type more of it")
    return found[0]


def _list(store: Store, args: Any, out: TextIO) -> int:
    if args.limit < 1 or args.offset < 0:
        raise InvalidInput("--limit must be at least 1 and --offset at least 0")
    page = store.list_sessions(offset=args.offset, limit=args.limit)
    for err in page.errors:
        print(f"{PROG}: warning: {err}", file=sys.stderr)
    if args.format == "json":
        json.dump([_session_json(s) for s in page.sessions], out, ensure_ascii=False, indent=2)
        out.write("\n")
        return 0
    if not page.sessions:
        print("no sessions" if page.total == 0 else "no sessions on this page", file=out)
        return 0
    width = max(len(s.id) for s in page.sessions)
    print(f"{'ID':<{width}}  {'UPDATED':<16}  {'MSGS':>5}  TITLE", file=out)
    for s in page.sessions:
        title = (s.title or "(untitled)").replace("\n", " ")
        print(f"{s.id:<{width}}  {_when(s.updated_at):<16}  {s.message_count:>5}  {title[:60]}", file=out)
    if page.next_offset is not None:
        print(f"... {page.total} in all; next page: {PROG} list --offset {page.next_offset}", file=out)
    return 0


def _session_json(s: Session) -> dict[str, Any]:
    return {"id": s.id, "title": s.title, "created_at": s.created_at, "updated_at": s.updated_at,
            "messages": s.message_count, "model": s.model, "tags": list(s.tags)}


def _show(store: Store, args: Any, out: TextIO) -> int:
    conv = store.load(_resolve(store, args.id))
    s = conv.session
    rows = [("id", s.id), ("title", s.title or "(untitled)"), ("created", _when(s.created_at)),
            ("updated", _when(s.updated_at)), ("messages", f"{s.message_count} (all branches)")]
    rows += [(k, v) for k, v in (("model", s.model), ("tags", ", ".join(s.tags)),
                                 ("sampling", json.dumps(s.sampling) if s.sampling else ""),
                                 ("pinned", ", ".join(s.pinned))) if v]
    for k, v in rows:
        print(f"{k + ':':<10} {v}", file=out)
    if s.system_prompt:
        print(f"\n── system prompt\n{s.system_prompt}", file=out)
    if s.summary:
        print(f"\n── summary ({s.summary.first_id} … {s.summary.last_id})\n{s.summary.text}", file=out)
    for m in conv.thread():
        alts = conv.siblings(m.id)
        notes = [f"{alts.index(m) + 1}/{len(alts)}"] if len(alts) > 1 else []
        notes += [m.status] if m.status != "complete" else []
        note = f" [{', '.join(notes)}]" if notes else ""
        print(f"\n── {m.role}{note} · {_when(m.created_at)} · {m.id}\n{m.content}", file=out)
    return 0


def _export(store: Store, args: Any, out: TextIO) -> int:
    conv = store.load(_resolve(store, args.id))
    text = to_json_text(conv) if args.format == "json" else to_markdown(conv)
    if args.output:
        tmp = args.output + ".part"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, args.output)
        print(f"exported {conv.session.id} to {args.output}", file=sys.stderr)
    else:
        out.write(text)
    return 0


def _import(store: Store, args: Any, out: TextIO) -> int:
    if args.file == "-":
        raw, source = sys.stdin.buffer.read(), "<stdin>"
    else:
        with open(args.file, "rb") as fh:
            raw, source = fh.read(), args.file
    done = import_text(store, decode_text(raw, source), source)
    for s in done:
        print(f"imported {s.id}  {s.message_count:>5} messages  {s.title[:60]}", file=out)
    return 0


def _delete(store: Store, args: Any, out: TextIO) -> int:
    try:
        session_id = _resolve(store, args.id)
    except NotFound:  # a full id still removes what is left of a session that is no longer listed
        session_id = args.id
    if not store.delete_session(session_id):
        raise NotFound("session", args.id, f"see `{PROG} list`")
    print(f"deleted {session_id}", file=out)
    return 0


_COMMANDS = {"list": _list, "show": _show, "export": _export, "import": _import, "delete": _delete}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

