"""The command line: a real chat turn, and one-line errors (no traceback) for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatcore", *args], capture_output=True, text=True, timeout=300,
                          input=stdin)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("chatcore: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow
def test_generate_streams_a_real_answer(demo_gguf: Path) -> None:
    done = run("generate", "--model", str(demo_gguf), "--prompt", "-", "--max-new-tokens", "30", "--stats",
               stdin="What is the capital of France?")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "tok/s" in done.stderr


def test_missing_path() -> None:
    assert_one_line_error(run("generate", "--model", "/no/such/model", "--prompt", "hi"), "does not exist")


def test_missing_config(tmp_path: Path) -> None:
    assert_one_line_error(run("generate", "--model", str(tmp_path), "--prompt", "hi"), "config.json")


def test_corrupt_safetensors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    good = (tiny_llama_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(good[: len(good) // 2])   # truncated download
    assert_one_line_error(run("generate", "--model", str(tmp_path), "--prompt", "hi"), "model.safetensors")


def test_garbage_safetensors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    assert_one_line_error(run("generate", "--model", str(tmp_path), "--prompt", "hi"), "corrupt")


def test_corrupt_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    assert_one_line_error(run("generate", "--model", str(bad), "--prompt", "hi"), "GGUF")


def test_unsupported_architecture(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run("generate", "--model", str(tmp_path), "--prompt", "hi"), "GPT2LMHeadModel", "Llama")


@pytest.mark.slow
def test_prompt_longer_than_the_window(demo_gguf: Path) -> None:
    done = run("generate", "--model", str(demo_gguf), "--max-seq-len", "32", "--prompt", "word " * 100)
    assert_one_line_error(done, "context window")


def test_bad_sampling_value(tiny_llama_dir: Path) -> None:
    assert_one_line_error(run("generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--top-p", "0"), "top_p")


def test_model_without_tokenizer(tiny_llama_dir: Path) -> None:
    assert_one_line_error(run("generate", "--model", str(tiny_llama_dir), "--prompt", "hi"), "tokenizer")


def test_help_lists_commands() -> None:
    done = run("--help")
    assert done.returncode == 0 and "generate" in done.stdout and "sessions" in done.stdout


def test_missing_shard(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    assert_one_line_error(run("generate", "--model", str(tmp_path), "--prompt", "hi"), shards[-1].name)
