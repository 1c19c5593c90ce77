"""A real `chatcore serve` process on 127.0.0.1 (an ephemeral port) for the server tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "context"))

from _context_helpers import CHATML, make_chat_model_dir  # noqa: E402

# ChatML with the tools rendered first (so a request's tools show in its prompt's token count)
TOOLS_TEMPLATE = ("{% if tools %}{{ '<|im_start|>system\nTools: ' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
                  + CHATML)
_LISTENING = re.compile(r"on http://127\.0\.0\.1:(\d+)/v1")


def make_model(path: Path) -> Path:
    """The tiny random chat model (byte-level tokenizer, ChatML) whose template also renders `tools`."""
    make_chat_model_dir(path)
    cfg = path / "tokenizer_config.json"
    data = json.loads(cfg.read_text(encoding="utf-8"))
    data["chat_template"] = TOOLS_TEMPLATE
    cfg.write_text(json.dumps(data), encoding="utf-8")
    return path


# The scripted model's greedy reply to any chat prompt (each piece one token; then <|im_end|>)
TOOL_SCRIPT = ("Let me check. ", "<tool_call>", '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
               "</tool_call>")


def make_tool_model(path: Path, script: tuple[str, ...] = TOOL_SCRIPT) -> Path:
    """The tiny chat model made to answer every prompt that ends in a newline (ChatML's generation prompt does)
    with `script`, greedily: each piece is a token of its own (added to the tokenizer), every layer's attention
    and MLP output is zero, so the logits depend on the last token only, and the embeddings and output head
    chain "\n" -> piece 1 -> ... -> piece n -> <|im_end|>. A real checkpoint through the real engine, whose
    output is known."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken, Tokenizer

    make_model(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in script])
    tok.save(str(path / "tokenizer.json"))
    chain = [tok.token_to_id("\u010a"), *(tok.token_to_id(p) for p in script), tok.token_to_id("<|im_end|>")]
    weights = load_file(str(path / "model.safetensors"))
    hidden = weights["model.embed_tokens.weight"].shape[1]
    assert len(chain) <= hidden and None not in chain
    for name, w in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w.zero_()
    weights["model.norm.weight"].fill_(1.0)
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    head.zero_()
    for j, (token, following) in enumerate(zip(chain[:-1], chain[1:], strict=True)):
        embed[token] = torch.nn.functional.one_hot(torch.tensor(j), hidden).float()
        head[following, j] = 4.0
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


class ServerProcess:
    """`python -m chatcore serve --model MODEL --port 0 ...` with `env` (where its storage is)."""

    def __init__(self, model: Path, env: dict[str, str], *args: str) -> None:
        self.model, self.env, self.args = model, env, args
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 120.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "chatcore", "serve", "--model", str(self.model), "--port", "0", "--device",
               "cpu", "--dtype", "float32", "--max-seq-len", "512", "--served-model-name", "tiny", *self.args]
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=REPO, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        found = threading.Event()

        def drain() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                m = _LISTENING.search(line)
                if m:
                    self.port = int(m.group(1))
                    found.set()
        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("chatcore serve did not start:\n" + "".join(self.lines))
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CHATCORE_HOME", "CHATCORE_API_KEY")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def wait_for(check, timeout: float = 15.0, step: float = 0.05):  # noqa: ANN001, ANN201
    """Poll `check()` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s")
        time.sleep(step)


@dataclass(frozen=True)
class Reply:
    status_code: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def request(url: str, method: str = "GET", *, key: str | None = None, json: Any = None,
            content: bytes | None = None) -> Reply:
    """One plain HTTP request (stdlib only): the status and body, whatever the status."""
    data = content if content is not None else (None if json is None else _dumps(json).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return Reply(r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read().decode())


_dumps = json.dumps
