"""`chatcore sessions ...` through storage.cli.main(argv) and `python -m storage.cli`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from storage import Store, key
from storage.cli import main

pytestmark = pytest.mark.redis


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def seed(store: Store) -> tuple[str, str]:
    a = store.create_session("First chat", tags=["x"])
    store.append_message(a.id, "user", "hello")
    store.append_message(a.id, "assistant", "hi there")
    b = store.create_session("Second chat", system_prompt="Be brief.")
    store.append_message(b.id, "user", "ping")
    return a.id, b.id


def test_list_table_and_json(store: Store, cli_env, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = seed(store)
    code, out, err = run(capsys, "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "UPDATED", "MSGS", "TITLE"]
    assert lines[1].startswith(b) and lines[1].endswith("Second chat") and lines[2].startswith(a)
    code, out, _ = run(capsys, "list", "--format", "json")
    rows = json.loads(out)
    assert [(r["id"], r["messages"], r["title"]) for r in rows] == [(b, 1, "Second chat"), (a, 2, "First chat")]
    code, out, _ = run(capsys, "list", "--limit", "1")
    assert "next page: chatcore sessions list --offset 1" in out


def test_show_export_import_delete(store: Store, cli_env, capsys: pytest.CaptureFixture[str],
                                   tmp_path: Path) -> None:
    a, b = seed(store)
    code, out, _ = run(capsys, "show", a[:-3])  # a unique prefix is enough
    assert code == 0 and f"id:        {a}" in out and "── user" in out and "hi there" in out

    code, md, _ = run(capsys, "export", a, "--format", "md")
    assert code == 0 and md.startswith("# First chat") and "## Assistant\n\nhi there" in md

    target = tmp_path / "a.json"
    code, _, err = run(capsys, "export", a, "-o", str(target))
    assert code == 0 and f"exported {a}" in err
    original = store.load(a)

    code, out, _ = run(capsys, "delete", a)
    assert code == 0 and out.strip() == f"deleted {a}"
    assert not store.session_exists(a)

    code, out, _ = run(capsys, "import", str(target))
    assert code == 0 and out.startswith(f"imported {a}")
    assert store.load(a) == original

    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
                     + "\n" + json.dumps({"messages": [{"role": "user", "content": "hey"}]}) + "\n")
    code, out, _ = run(capsys, "import", str(jsonl))
    assert code == 0 and len(out.splitlines()) == 2
    assert store.count_sessions() == 4


@pytest.mark.parametrize("argv, status, fragment", [
    (["show", "nope"], 1, "no session 'nope'"),
    (["delete", "nope"], 1, "no session 'nope'"),
    (["export", "nope", "--format", "pdf"], 2, "invalid choice: 'pdf'"),
    (["import", "/no/such/file.jsonl"], 1, "No such file or directory"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ([], 2, "missing command"),
    (["list", "--limit", "0"], 1, "--limit must be at least 1"),
    (["show", "bad id!"], 1, "invalid session id"),
])
def test_user_mistakes_are_one_line(cli_env, capsys: pytest.CaptureFixture[str], argv: list[str], status: int,
                                    fragment: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == status and out == ""
    assert err.count("\n") == 1 and err.startswith("chatcore sessions: ") and fragment in err
    assert "Traceback" not in err


def test_bad_import_file_and_ambiguous_prefix(store: Store, cli_env, capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": []}\n{"oops"\n')
    code, _, err = run(capsys, "import", str(bad))
    assert code == 1 and f"{bad}:2: not valid JSON" in err and err.count("\n") == 1
    assert store.count_sessions() == 0  # nothing half-imported
    store.create_session(session_id="dup-1")
    store.create_session(session_id="dup-2")
    code, _, err = run(capsys, "show", "dup")
    assert code == 1 and "ambiguous" in err
    code, _, err = run(capsys, "delete", "dup")
    assert code == 1 and "ambiguous" in err and err.count("\n") == 1
    assert store.session_exists("dup-1") and store.session_exists("dup-2")


def test_delete_takes_a_unique_prefix(store: Store, cli_env, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = seed(store)
    code, out, err = run(capsys, "delete", a[:-3])  # as show takes it
    assert (code, out, err) == (0, f"deleted {a}\n", "")
    assert not store.session_exists(a) and store.session_exists(b)
    store.create_session(session_id="dup-1")
    store.create_session(session_id="dup-10")
    code, out, _ = run(capsys, "delete", "dup-1")  # a full id that is also a prefix of another
    assert (code, out) == (0, "deleted dup-1\n") and store.session_exists("dup-10")


def test_corrupt_session_is_a_warning_in_list(store: Store, cli_env, backend,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    a, b = seed(store)
    backend.client.hset(key("meta", a), "tags", "{{{")
    code, out, err = run(capsys, "list")
    assert code == 0 and b in out and a not in out
    assert "warning" in err and key("meta", a) in err


def test_help_and_dead_redis_url(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "list" in out and "--redis-url" in out
    code, out, err = run(capsys, "list", "--redis-url", "redis://:hunter2@127.0.0.1:1/0")
    assert code == 1 and "hunter2" not in err and "redis://:***@127.0.0.1:1/0" in err and err.count("\n") == 1
    monkeypatch.setenv("REDIS_URL", "redis://:hunter3@127.0.0.1:1/0")
    code, out, err = run(capsys, "list")
    assert code == 1 and "hunter3" not in err and "cannot reach Redis" in err


def test_python_dash_m(store: Store, backend) -> None:
    a, _ = seed(store)
    done = subprocess.run([sys.executable, "-m", "storage.cli", "list", "--format", "json"], env=backend.env,
                          cwd=backend_cwd(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert a in [r["id"] for r in json.loads(done.stdout)]
    bad = subprocess.run([sys.executable, "-m", "storage.cli", "show", "missing"], env=backend.env,
                         cwd=backend_cwd(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def backend_cwd() -> Path:
    return Path(__file__).resolve().parents[2]


GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"}]})
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(("line", "reason"), [
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "lone surrogate (\\ud800 at character 2)"),
    (b'{"messages": [{"role": "user", "content": "x"}], "tags": ' + DEEP.encode() + b"}", "nested more than 64"),
    (b'{"messages": [{"role": "user", "content": "' + b"x" * (9 << 20) + b'"}]}', "over the 8,388,608-byte"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "not plain JSON data"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not UTF-8 text (byte 0xe9 at byte 47 of the line)"),
], ids=["surrogate", "deep", "oversize", "nan", "not-utf8"])
def test_a_bad_line_imports_nothing(store: Store, cli_env, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                    line: bytes, reason: str) -> None:
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\n".join([GOOD_LINE.encode(), line, GOOD_LINE.encode()]) + b"\n")
    code, out, err = run(capsys, "import", str(src))
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"chatcore sessions: {src}:2: ") and reason in err
    assert cli_env.client.dbsize() == 0  # nothing written, not even the first line's session


def test_a_utf8_bom_and_a_deep_document(store: Store, cli_env, capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + f"{GOOD_LINE}\n{GOOD_LINE}\n".encode())
    code, out, err = run(capsys, "import", str(src))
    assert code == 0 and err == "" and out.count("imported ") == 2 and store.count_sessions() == 2
    deep = tmp_path / "deep.json"
    deep.write_text('{"format": "chatcore.session",\n "session":\n' + DEEP + "\n}\n")
    code, _, err = run(capsys, "import", str(deep))
    assert code == 1 and err == f"chatcore sessions: {deep}: nested more than 64 deep\n"
    assert store.count_sessions() == 2


def test_a_file_of_one_bad_line_names_the_line(store: Store, cli_env, capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    src = tmp_path / "one.jsonl"
    src.write_text('\n{"messages": [{"role": "user", "content": "hi\\udfff"}]}\n')
    code, _, err = run(capsys, "import", str(src))
    assert code == 1 and err.startswith(f"chatcore sessions: {src}:2: a string holds a lone surrogate")
    assert cli_env.client.dbsize() == 0


@pytest.mark.parametrize("command", [["storage.cli"], ["chatcore", "sessions"]])
def test_reader_that_stops_early_is_no_error(store: Store, backend, command: list[str]) -> None:
    """`show ID | head -1`: the pipe closes while output (far more than a pipe buffer) is still coming."""
    s = store.create_session("Long")
    for k in range(40):
        store.append_message(s.id, "user" if k % 2 == 0 else "assistant", f"line {k}\n" * 500)
    proc = subprocess.Popen([sys.executable, "-m", *command, "show", s.id], env=backend.env, cwd=backend_cwd(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == f"id:        {s.id}\n"
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0 and err == ""
