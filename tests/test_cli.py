"""The command line: a real chat turn, and one-line errors (no traceback) for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


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


@pytest.mark.parametrize("option, fragment", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "mps"], "device 'mps' is not supported"),
    (["--device", "cuda:x"], "unknown device 'cuda:x'"),
    (["--dtype", "int8"], "unsupported dtype 'int8'"),
    (["--max-seq-len", "-5"], "max_seq_len must be a positive number of tokens, got -5"),
    (["--max-seq-len", "0"], "max_seq_len must be a positive number of tokens, got 0"),
])
def test_bad_load_option(tiny_llama_dir: Path, option: list[str], fragment: str) -> None:
    assert_one_line_error(run("generate", "--model", str(tiny_llama_dir), "--prompt", "hi", *option), fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_cuda_without_cuda(tiny_llama_dir: Path, device: str) -> None:
    done = run("generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--device", device)
    assert_one_line_error(done, f"device {device!r} is not available", "use cpu")


def test_bad_device_fails_before_the_demo_model_is_fetched(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "CHATCORE_HOME": str(tmp_path)}  # an empty cache: the demo model would be fetched
    done = subprocess.run([sys.executable, "-m", "chatcore", "generate", "--prompt", "hi", "--device", "tpu"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert_one_line_error(done, "unknown device 'tpu'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("prompt, stdin, where", [("", None, "with --prompt"), ("  \n\t", None, "with --prompt"),
                                                  ("-", " \n", "on stdin")])
def test_empty_prompt_is_refused(tiny_llama_dir: Path, prompt: str, stdin: str | None, where: str) -> None:
    done = run("generate", "--model", str(tiny_llama_dir), "--prompt", prompt, stdin=stdin)
    assert_one_line_error(done, "the prompt is empty", where)


def test_window_above_the_models_is_cut_with_a_notice(tiny_llama_dir: Path) -> None:
    done = run("generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--max-seq-len", "99999")
    assert done.stderr.splitlines()[0] == ("chatcore: max_seq_len 99999 is above the model's window of 512 tokens; "
                                           "using 512")


def test_library_refuses_the_same_options(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import chatcore
    from chatcore.errors import DeviceUnavailable, LoadOptionError

    with pytest.raises(DeviceUnavailable, match="unknown device 'tpu'"):
        chatcore.load(tiny_llama_dir, device="tpu")
    with pytest.raises(LoadOptionError, match="unsupported dtype torch.int8"):
        chatcore.load(tiny_llama_dir, device="cpu", dtype=torch.int8)
    with pytest.raises(ValueError, match="prefill_chunk must be a positive"):   # still a ValueError
        chatcore.load(tiny_llama_dir, device="cpu", prefill_chunk=0)
    notices: list[str] = []
    engine = chatcore.load(tiny_llama_dir, device="cpu", max_seq_len=4096, status=notices.append)
    assert engine.window == 512 and notices == [
        "chatcore: max_seq_len 4096 is above the model's window of 512 tokens; using 512"]
    notices.clear()
    assert chatcore.load(tiny_llama_dir, device="cpu", max_seq_len=512, status=notices.append).window == 512
    assert notices == []
    # a GPU index past the visible ones (two GPUs pretended: nothing is loaded, the check comes first)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceUnavailable, match=r"'cuda:7' is not available: 2 CUDA GPUs visible \(cuda:0..cuda:1\)"):
        chatcore.load(tiny_llama_dir, device="cuda:7")


def chat_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """`chatcore chat ARGV` in this process, failing the test if the UI would start."""
    from chatcore.cli import main
    from tui.app import ChatApp

    def no_ui(self: ChatApp) -> None:
        raise AssertionError("the UI started")

    monkeypatch.setattr(ChatApp, "run", no_ui)
    code = main(["chat", *argv])
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    return code, err


@pytest.mark.parametrize("value", ["0", "-5"])
def test_chat_refuses_a_window_below_one(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                         value: str) -> None:
    code, err = chat_main(monkeypatch, capsys, "--max-seq-len", value)
    assert code == 2 and err == (f"chatcore: error: max_seq_len must be a positive number of tokens, got {value} "
                                 "(leave it out for the default)\n")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask-022", "umask-027"])
def test_convert_writes_files_with_the_usual_mode(tiny_llama_dir: Path, tmp_path: Path, umask: int,
                                                  mode: int) -> None:
    import os
    import stat

    from gguf_convert import write_gguf

    gguf = write_gguf(tiny_llama_dir, tmp_path / "model.gguf")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "chatcore", "convert", str(gguf), str(out)], capture_output=True,
                          text=True, timeout=300, preexec_fn=lambda: os.umask(umask))
    assert done.returncode == 0, done.stderr
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert "model.safetensors" in modes and "config.json" in modes
    assert modes == dict.fromkeys(modes, mode)


def test_chat_refuses_a_missing_keymap_file(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    missing = tmp_path / "nokeys.toml"
    code, err = chat_main(monkeypatch, capsys, "--keymap", str(missing))
    assert code == 2 and err == f"chatcore: error: no keymap file at {missing}\n"
    code, err = chat_main(monkeypatch, capsys, "--keymap", str(tmp_path))   # a directory is no keymap either
    assert code == 2 and err == f"chatcore: error: no keymap file at {tmp_path}\n"
