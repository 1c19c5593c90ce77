"""From a checkpoint on disk to a model: the steps every load runs, in one process or on each tensor-parallel rank.

open (config, tensor source, tokenizer; no weights read yet) -> check the tensors the family reads -> the
runtime -> read each tensor (whole, or a rank's part of it: ``get``) with progress -> the family's model.
:func:`chatcore.load` runs them for one process (:func:`load_engine`); :mod:`chatcore.parallel` runs them
on every rank with its own ``get`` (this module knows nothing of tensor parallel).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chatcore.checkpoint_config import config_from_gguf, config_from_hf_file
from chatcore.config import ModelConfig, RopeScaling
from chatcore.engine import Engine
from chatcore.errors import LoadOptionError, ModelFormatError
from chatcore.layers.attention import pick_backend
from chatcore.models import FAMILIES
from chatcore.models.base import CausalLM
from chatcore.quant.names import quantized_names
from chatcore.quant.packed import PackedWeight
from chatcore.quant.quantize import GROUPS, MODES, check_device, fit_group, quantized_nbytes
from chatcore.runtime import Runtime
from chatcore.tokenizer import Tokenizer
from chatcore.tokenizer.hf import HFTokenizer
from chatcore.weights import TensorSource
from chatcore.weights.quantizing import QuantizingSource

# progress(done, total) while tensors load
Progress = Callable[[int, int], None]
Opened = tuple[ModelConfig, TensorSource, Tokenizer | None]


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
    try:
        tok_cfg = tokenizer_config_from_gguf(meta)
        # ensure_ascii=False: byte-level vocabularies are mostly non-ASCII, and unescaped JSON parses faster
        tok_json = json.dumps(tokenizer_json_from_gguf(meta), ensure_ascii=False)
        tok = HFTokenizer(HFTok.from_str(tok_json), tok_cfg, extra_eos_ids=cfg.eos_token_ids)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ModelFormatError(f"{p}: its tokenizer cannot be built ({exc}); the file is incomplete") from None
    return cfg, source, tok


def _settings_from_tensors(cfg: ModelConfig, names: set[str]) -> ModelConfig:
    """What GGUF metadata does not say but its tensors do (a tied output head, biases): the family reads it."""
    return FAMILIES[cfg.family].settings_from_tensors(cfg, names)


def check_tensors(p: Path, cfg: ModelConfig, source: TensorSource) -> list[str]:
    """The tensor names the model's family reads; raise :class:`ModelFormatError` if any is missing or its shape
    (from the file's header: no data is read) is not the one the config implies. Runs before anything is
    allocated for the model, so a config claiming more layers, a wider vocabulary or longer rows than the
    tensors hold is one error, never a huge allocation."""
    present = source.names()
    layers = _layers_present(present)
    if cfg.num_layers > max(layers, 1) or cfg.num_layers > len(present):
        raise ModelFormatError(f"{p}: the config says {cfg.num_layers} layers but the tensors hold {layers}; "
                               "the config does not belong to these weights")
    shapes = FAMILIES[cfg.family].shapes(cfg)
    missing = [n for n in shapes if n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFormatError(f"{p} lacks the tensor {missing[0]!r}{more}; the checkpoint is incomplete")
    for name, want in shapes.items():
        have = source.shape(name)
        if have != tuple(want):
            raise ModelFormatError(f"{p}: tensor {name!r} has shape {list(have)} but the config implies "
                                   f"{list(want)}; the config does not belong to these weights")
    return list(shapes)


def _layers_present(names: set[str]) -> int:
    """How many layers the tensors hold: distinct indices in names like ``model.layers.7.mlp...``."""
    return len({m.group(1) for n in names if (m := _LAYER.search(n))})


_LAYER = re.compile(r"\.(\d+)\.")


def open_checked(p: Path) -> Opened:
    """:func:`open_checkpoint`, then :func:`check_tensors`."""
    cfg, source, tokenizer = open_checkpoint(p)
    check_tensors(p, cfg, source)
    check_special_ids(p, cfg, tokenizer)
    return cfg, source, tokenizer


def check_special_ids(p: Path, cfg: ModelConfig, tokenizer: Tokenizer | None) -> None:
    """The BOS id (config's or tokenizer's) and the tokenizer's EOS ids must be rows of the embedding: a
    tokenizer whose special tokens lie past the vocabulary would fail every prompt or never end a reply. (A
    tokenizer shorter than the vocabulary is common and fine: ids it lacks decode to nothing.)"""
    ids = [("bos_token_id in config.json", cfg.bos_token_id)]
    if tokenizer is not None:
        ids += [("the tokenizer's BOS token", tokenizer.bos_token_id),
                *(("the tokenizer's EOS token", i) for i in tokenizer.eos_token_ids)]
    for what, i in ids:
        if i is not None and not 0 <= i < cfg.vocab_size:
            raise ModelFormatError(f"{p}: {what} is id {i}, outside the model's vocabulary of {cfg.vocab_size}; "
                                   "the tokenizer does not belong to these weights")


@dataclass(frozen=True)
class LoadOptions:
    """What the caller asked of the runtime (see :func:`chatcore.load`); None: the default for the device."""

    max_seq_len: int | None = None
    prefill_chunk: int | None = None
    attention: str = "auto"
    cuda_graphs: bool = True
    packed: bool | None = None      # GGUF quantized tensors kept packed (None: on CUDA yes, on the CPU no)
    quantize: str | None = None     # "int8", "int4" or "fp8": float projections quantized on load
    quant_group: int = 64           # int4's group: 32, 64 or 128 columns
    kv_dtype: str | None = None     # KV cache storage: None (the compute dtype), "int8" or "fp8"

    def __post_init__(self) -> None:
        for name in ("max_seq_len", "prefill_chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LoadOptionError(f"{name} must be a positive number of tokens, got {value} "
                                      "(leave it out for the default)")
        if self.packed not in (None, True, False):
            raise LoadOptionError(f"packed must be True, False or None (by device), got {self.packed!r}")
        if self.quantize is not None and self.quantize not in MODES:
            raise LoadOptionError(f"unknown quantize {self.quantize!r}; use one of {', '.join(MODES)}")
        if self.quant_group not in GROUPS:
            raise LoadOptionError(f"quant_group must be {', '.join(map(str, GROUPS))} columns, "
                                  f"got {self.quant_group!r}")
        if self.kv_dtype not in (None, "int8", "fp8"):
            raise LoadOptionError(f"unknown kv_dtype {self.kv_dtype!r}; use int8 or fp8 (or leave it out for "
                                  "the compute dtype)")
        if self.quantize is not None and self.packed is False:
            raise LoadOptionError(f"quantize={self.quantize!r} keeps the weights packed; it cannot be combined "
                                  "with packed=False (--dequantize)")


def serve_source(source: TensorSource, cfg: ModelConfig, dev: torch.device, options: LoadOptions,
                 status: Callable[[str], None] | None = None) -> TensorSource:
    """``source`` as ``options`` ask the weights served on ``dev``: a GGUF file's quantized 2-D tensors kept
    packed (``packed``; by default on CUDA), the projections quantized on load (``quantize``); ``status`` gets a
    notice for what cannot be kept packed and for packed weights on the CPU. Raises :class:`LoadOptionError`
    for ``quantize`` on already-quantized GGUF tensors or fp8 on a GPU without it."""
    from chatcore.quant.gguf_pack import PACKABLE
    from chatcore.weights.gguf_file import FLOAT_TYPES, GGUFTensors

    say = status or (lambda _msg: None)
    family = FAMILIES[cfg.family]
    names = family.tensor_names(cfg)
    packs = False
    if options.quantize is not None:
        check_device(options.quantize, dev)
        chosen = quantized_names(family.split_rules, names)
        if isinstance(source, GGUFTensors):
            typed = sorted({source.type_of(n).name for n in chosen if source.type_of(n) not in FLOAT_TYPES})
            if typed:
                raise LoadOptionError(f"quantize={options.quantize!r}: {source.path.name} is already quantized "
                                      f"({', '.join(typed)}); quantize a float checkpoint (safetensors, or a "
                                      "GGUF of F16/BF16/F32 tensors), or load this file as it is")
        fits = [n for n in chosen if _quantizable(source.shape(n), options)]
        if len(fits) < len(chosen):
            say(f"chatcore: {len(chosen) - len(fits)} projection(s) have a width that {options.quantize} "
                "cannot pack (not a multiple of 32); they stay float")
        source, packs = QuantizingSource(source, fits, options.quantize, options.quant_group, dev), bool(fits)
        narrow = {n: g for n in fits if (g := source.group_of(n)) != options.quant_group}
        if narrow:
            say(f"chatcore: {len(narrow)} projection(s) have a width that is not a multiple of "
                f"{options.quant_group}; they take int4 groups of "
                f"{' / '.join(map(str, sorted(set(narrow.values()), reverse=True)))} columns")
    gguf = source.base if isinstance(source, QuantizingSource) else source
    if isinstance(gguf, GGUFTensors) and (options.packed or (options.packed is None and dev.type == "cuda")):
        packed = gguf.packed_on(dev)
        mats = [n for n in names if len(gguf.shape(n)) == 2 and gguf.type_of(n) not in FLOAT_TYPES]
        left = sorted({gguf.type_of(n).name for n in mats if not packed.packs(n)})
        if left:
            say(f"chatcore: tensors of type {', '.join(left)} have no packed layout; they are dequantized to "
                f"the compute dtype (packed: {', '.join(sorted(t.name for t in PACKABLE))})")
        packs = packs or len(left) < len({gguf.type_of(n).name for n in mats})
        if isinstance(source, QuantizingSource):
            source.base = packed
        else:
            source = packed
    if packs and dev.type == "cpu":
        say("chatcore: weights are kept packed on the CPU, which saves memory but runs slower than float32 "
            "there (for memory and testing); leave packed / --packed and --quantize out for speed")
    return source


def _quantizable(shape: tuple[int, ...], options: LoadOptions) -> bool:
    """Whether a tensor of ``shape`` fits ``options.quantize``'s layout (2-D, its width on the blocks)."""
    if len(shape) != 2:
        return False
    mode = options.quantize
    try:
        group = fit_group(shape[1], options.quant_group) if mode == "int4" else options.quant_group
        quantized_nbytes((shape[0], shape[1]), mode, group)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


def make_runtime(cfg: ModelConfig, dev: torch.device, dt: torch.dtype, options: LoadOptions) -> Runtime:
    # dynamic NTK RoPE may serve past max_position_embeddings (its table is frozen for this window)
    window = min(options.max_seq_len or cfg.max_position_embeddings, cfg.max_window)
    chunk = options.prefill_chunk
    return Runtime(device=dev, dtype=dt, max_seq_len=window,
                   prefill_chunk=chunk or (32768 if dev.type == "cuda" else 512),
                   attention_backend=pick_backend(options.attention, dev, dt), cuda_graphs=options.cuda_graphs,
                   chunk_by_memory=chunk is None and dev.type == "cuda", kv_dtype=options.kv_dtype)


def build_model(cfg: ModelConfig, runtime: Runtime, get: Callable[[str], torch.Tensor],
                progress: Progress | None = None) -> CausalLM:
    """The family model of ``cfg`` on ``runtime``: ``get(name)`` reads each tensor by its Hugging Face name
    (whole, or a rank's part), moved here to the runtime's device and dtype; ``progress(done, total)`` follows."""
    family = FAMILIES[cfg.family]
    total, done = len(family.tensor_names(cfg)), 0

    def fetch(name: str) -> torch.Tensor:
        nonlocal done
        got = get(name)   # a packed weight keeps its planes' dtypes
        dev = runtime.device
        t = got.to(device=dev) if isinstance(got, PackedWeight) else got.to(device=dev, dtype=runtime.dtype)
        done += 1
        if progress is not None:
            progress(done, total)
        return t

    return family(cfg, runtime, fetch, runtime.attention_backend)


def load_engine(p: Path, opened: Opened, dev: torch.device, dt: torch.dtype, options: LoadOptions,
                progress: Progress | None = None, status: Callable[[str], None] | None = None) -> Engine:
    """The whole model of a checked checkpoint (:func:`open_checked`) in this process, as an :class:`Engine`.

    The window is capped to what memory holds (:func:`fit_window`); ``status`` gets the notice when it is."""
    cfg, source, tokenizer = opened
    source = serve_source(source, cfg, dev, options, status)
    runtime = make_runtime(cfg, dev, dt, options)
    window, notice = fit_window(cfg, dev, dt, runtime.max_seq_len, free_memory(dev), source=source,
                                kv_dtype=options.kv_dtype)
    if notice is not None:
        runtime = dataclasses.replace(runtime, max_seq_len=window)
        if status is not None:
            status(notice)
    return Engine(build_model(cfg, runtime, source.get, progress), cfg, runtime, tokenizer, source=str(p))


def window_bytes_per_token(cfg: ModelConfig, dt: torch.dtype, kv_dtype: str | None = None) -> int:
    """Memory a token of the window takes: a slot's keys and values in every layer (one byte an element for an
    int8 / fp8 cache, and a float32 scale per head, an upper bound for per-head scales), and the RoPE tables
    (float32 cos / sin and a copy in ``dt``; two tables for models with a local RoPE base)."""
    size = torch.tensor([], dtype=dt).element_size()
    heads = 2 * cfg.num_layers * cfg.num_kv_heads
    kv = heads * cfg.head_dim * size if kv_dtype is None else heads * (cfg.head_dim + 4)
    return kv + 2 * cfg.head_dim * (4 + size)


def weight_bytes(cfg: ModelConfig, dt: torch.dtype, source: TensorSource | None = None) -> int:
    """Memory the model's weights take in ``dt``; with ``source``, a tensor it serves packed counts its packed
    bytes (``source.packed_nbytes(name)``, from the header: nothing is read)."""
    size = torch.tensor([], dtype=dt).element_size()
    packed = getattr(source, "packed_nbytes", None)
    total = 0
    for name, shape in FAMILIES[cfg.family].shapes(cfg).items():
        nbytes = packed(name) if packed is not None else None
        total += size * math.prod(shape) if nbytes is None else nbytes
    return total


def free_memory(dev: torch.device) -> int | None:
    """Bytes free for the model on ``dev``: the GPU's free memory, or the host's available memory
    (``MemAvailable`` of /proc/meminfo); None where that cannot be read."""
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# the share of the memory left after the weights that a window's cache may take (the rest: activations)
WINDOW_SHARE = 0.8
MIN_WINDOW = 512   # never capped below this (or the model's own window, when smaller)


def fit_window(cfg: ModelConfig, dev: torch.device, dt: torch.dtype, window: int, free: int | None, *,
               source: TensorSource | None = None, kv_dtype: str | None = None) -> tuple[int, str | None]:
    """``window``, or the longest one whose cache fits ``free`` bytes after the weights, with a notice saying so
    (None: it fits, or ``free`` is unknown). ``source``: the weights as served (packed ones count packed,
    :func:`weight_bytes`); ``kv_dtype``: the cache's storage (:func:`window_bytes_per_token`)."""
    per_token = window_bytes_per_token(cfg, dt, kv_dtype)
    if free is None:
        return window, None
    weights = weight_bytes(cfg, dt, source)
    budget = max(int((free - weights) * WINDOW_SHARE), 0)
    if window * per_token <= budget:
        return window, None
    fit = max(budget // per_token, min(MIN_WINDOW, window))
    if fit >= window:
        return window, None
    fit = fit // 256 * 256 if fit >= 256 else fit
    where = "on the GPU" if dev.type == "cuda" else "in RAM"
    return fit, (f"chatcore: a {window}-token window needs {_gb(window * per_token)} for its KV cache; "
                 f"{_gb(free)} is free {where} (weights {_gb(weights)}), so the window is "
                 f"{fit} tokens; choose it with max_seq_len (--max-seq-len)")


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
