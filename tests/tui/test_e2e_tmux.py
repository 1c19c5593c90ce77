"""End to end in a real terminal: tmux runs `python -m chatcore chat` with the demo model; ctrl+j and a
bracketed paste put line breaks in the message box without sending; a question is typed, the answer read
from the pane; quit; start again and the session is still there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")]


QUESTION = "What is the capital of France?"


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=False).stdout


def _wait(cond: Callable[[], bool], what: str, pane: Callable[[], str], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; pane:\n{pane()}")


def _consecutive(text: str, first: str, second: str) -> bool:
    lines = text.splitlines()
    return any(first in a and second in b for a, b in zip(lines, lines[1:], strict=False))


def test_chat_in_tmux(demo_gguf: Path, tmp_path: Path) -> None:
    name = f"chatcore-e2e-{os.getpid()}"
    env = {**os.environ, "CHATCORE_HOME": str(tmp_path / "home"), "TERM": "xterm-256color"}
    env.pop("REDIS_URL", None)
    cmd = f"{sys.executable} -m chatcore chat --model {demo_gguf}"

    def pane() -> str:
        return _tmux("capture-pane", "-p", "-t", name)

    def alive() -> bool:
        return subprocess.run(["tmux", "has-session", "-t", name], capture_output=True).returncode == 0

    def start() -> None:
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "160", "-y", "40", cmd], env=env,
                       check=True, cwd=Path(__file__).parents[2])

    try:
        start()
        _wait(lambda: "Message (Enter to send" in pane(), "first paint", pane)
        # ctrl+j breaks the line; a multi-line paste arrives whole; neither sends
        _tmux("send-keys", "-t", name, "-l", "alpha1")
        _tmux("send-keys", "-t", name, "C-j")
        _tmux("send-keys", "-t", name, "-l", "beta2")
        _wait(lambda: _consecutive(pane(), "alpha1", "beta2"), "two lines in the box", pane)
        _tmux("set-buffer", "-b", "cc", "\ngamma3\ndelta4")
        _tmux("paste-buffer", "-p", "-b", "cc", "-t", name)
        _wait(lambda: _consecutive(pane(), "gamma3", "delta4"), "the pasted lines", pane)
        assert _consecutive(pane(), "alpha1", "beta2") and "user" not in pane()  # nothing sent
        _tmux("send-keys", "-t", name, "-N", str(len("alpha1\nbeta2\ngamma3\ndelta4")), "BSpace")
        _wait(lambda: "Message (Enter to send" in pane(), "the box emptied", pane)
        _tmux("send-keys", "-t", name, "-l", QUESTION)
        _tmux("send-keys", "-t", name, "Enter")
        _wait(lambda: "Paris" in pane() and "ttft" in pane(), "the answer", pane, timeout=120)
        assert QUESTION in pane()
        _tmux("send-keys", "-t", name, "C-q")
        _wait(lambda: not alive(), "a clean exit", pane, timeout=30)
        start()
        _wait(lambda: QUESTION in pane() and "Paris" in pane(), "the stored session", pane, timeout=120)
        _tmux("send-keys", "-t", name, "C-q")
        _wait(lambda: not alive(), "a clean exit", pane, timeout=30)
    finally:
        if alive():
            _tmux("kill-session", "-t", name)
