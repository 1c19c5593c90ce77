"""No credential from a Redis URL reaches an error, a log line, a repr or the CLI's output, in any form
redis-py reads one (userinfo, `?password=`, `?ssl_password=`), percent-encoded or not. No server needed:
every URL points at a dead port or a missing socket."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import pytest
from _storage_helpers import free_port

from storage import InvalidInput, StorageError, StoreUnavailable, open_store, redact_url
from storage.cli import main
from storage.urls import url_secrets

SECRET = "s3cr3t-P@ss:w/rd?#&="
# Each form: a URL template ({port}, {sock}) and the secret as it is written in it.
FORMS = {
    "userinfo": ("redis://alice:{q}@127.0.0.1:{port}/0", "s3cr3t-P%40ss%3Aw%2Frd%3F%23%26%3D"),
    "password only": ("redis://:{q}@127.0.0.1:{port}/0", "s3cr3t-P%40ss%3Aw%2Frd%3F%23%26%3D"),
    "lone userinfo": ("redis://{q}@127.0.0.1:{port}/0", "s3cr3t-P%40ss%3Aw%2Frd%3F%23%26%3D"),
    "query": ("redis://127.0.0.1:{port}/0?password={q}", "s3cr3t-P%40ss%3Aw%2Frd%3F%23%26%3D"),
    "query, plain": ("redis://127.0.0.1:{port}/0?password={q}", "s3cr3t-plain"),
    "username + password": ("redis://127.0.0.1:{port}/0?username=alice&password={q}&db=1",
                            "s3cr3t-P%40ss%3Aw%2Frd%3F%23%26%3D"),
    "name percent-encoded": ("redis://127.0.0.1:{port}/0?pass%77ord={q}", "s3cr3t-plain"),
    "plus for space": ("redis://127.0.0.1:{port}/0?password={q}", "s3cr3t+with+spaces"),
    "tls": ("rediss://:{q}@127.0.0.1:{port}/0", "s3cr3t-P%40ss%3Aw%2Frd%3F%23%26%3D"),
    "tls query": ("rediss://127.0.0.1:{port}/0?password={q}&ssl_cert_reqs=none", "s3cr3t-plain"),
    "tls key password": ("rediss://127.0.0.1:{port}/0?ssl_password={q}", "s3cr3t-plain"),
    "unix": ("unix://{sock}?password={q}&db=0", "s3cr3t-P%40ss%3Aw%2Frd%3F%23%26%3D"),
    "unix userinfo": ("unix://:{q}@{sock}", "s3cr3t-plain"),
    "upper-case name": ("redis://127.0.0.1:{port}/0?PASSWORD={q}", "s3cr3t-plain"),
    "mixed-case name": ("redis://127.0.0.1:{port}/0?Password={q}", "s3cr3t-plain"),
    "unencoded '#' in password": ("redis://:s3cr3t#{q}@127.0.0.1:{port}/0", "tail"),
    "unencoded '/' in password": ("redis://:s3cr3t/{q}@127.0.0.1:{port}/0", "tail"),
    "bad port": ("redis://:{q}@127.0.0.1:notaport/0", "s3cr3t-plain"),
}


def _url(form: str, tmp_path: Path) -> tuple[str, list[str]]:
    template, quoted = FORMS[form]
    url = template.format(q=quoted, port=free_port(), sock=tmp_path / "no.sock")
    decoded = url_secrets(url)
    return url, ["s3cr3t", quoted, *decoded]


def _leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if len(s) > 3 and s in text]


def _shown(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + repr(exc)


@pytest.mark.parametrize("form", list(FORMS))
def test_open_store_error_hides_the_secret(form: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url, secrets = _url(form, tmp_path)
    with pytest.raises(StorageError) as info:
        open_store(url)
    msg = str(info.value)
    assert "\n" not in msg and "***" in msg, msg
    assert not _leaks(_shown(info.value) + caplog.text, secrets), msg
    if isinstance(info.value, StoreUnavailable):
        assert "***" in info.value.where and not _leaks(info.value.where, secrets)
    else:
        assert isinstance(info.value, InvalidInput)


@pytest.mark.parametrize("form", [f for f in FORMS if f != "bad port"])
def test_lazy_store_hides_the_secret_in_repr_and_every_error(form: str, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url, secrets = _url(form, tmp_path)
    try:
        store = open_store(url, check=False)
    except InvalidInput as exc:  # a name redis-py does not take fails at once (upper case, '#' in a password)
        assert not _leaks(_shown(exc), secrets)
        return
    assert not _leaks(repr(store) + store.where, secrets)
    with pytest.raises(StoreUnavailable) as info:
        store.list_sessions()
    assert not _leaks(_shown(info.value) + caplog.text, secrets)
    store.close()


@pytest.mark.parametrize("form", list(FORMS))
def test_cli_output_hides_the_secret(form: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    url, secrets = _url(form, tmp_path)
    monkeypatch.delenv("REDIS_URL", raising=False)
    code = main(["list", "--redis-url", url])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and err.count("\n") == 1 and "***" in err, err
    assert not _leaks(out + err, secrets), err
    monkeypatch.setenv("REDIS_URL", url)  # the same through the environment
    assert main(["list"]) == 1
    out, err = capsys.readouterr()
    assert "***" in err and not _leaks(out + err, secrets), err


def test_store_unavailable_redacts_a_url_it_is_given() -> None:
    exc = StoreUnavailable("redis://h:1/0?password=hunter22&db=0", "refused")
    assert "hunter22" not in str(exc) and "hunter22" not in exc.where
    assert exc.where == "redis://h:1/0?password=***&db=0"
    assert StoreUnavailable("embedded Redis (/a/b.rdb)", "x").where == "embedded Redis (/a/b.rdb)"


def test_redact_url_keeps_everything_but_the_secret() -> None:
    assert redact_url("unix:///tmp/r.sock?password=pw&db=2") == "unix:///tmp/r.sock?password=***&db=2"
    assert redact_url("redis://h:1/0?username=al&Password=pw&db=1") == "redis://h:1/0?username=al&Password=***&db=1"
    assert redact_url("rediss://u:pw@h:6380/0?ssl_password=k") == "rediss://u:***@h:6380/0?ssl_password=***"
    assert redact_url("redis://pw@h/0") == "redis://***@h/0"
    assert redact_url("redis://:p#w@h/0") == "redis://***"
    assert redact_url("redis://h:6379/0?db=3") == "redis://h:6379/0?db=3"
    assert redact_url("not a url") == "not a url"
