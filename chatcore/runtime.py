"""Runtime choices for a loaded model: where it runs and how big its caches may grow."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chatcore.errors import DeviceUnavailable, LoadOptionError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    max_seq_len: int            # tokens a cache slot may hold (the context window in use)
    prefill_chunk: int = 512    # prompt tokens per forward pass; bounds activation memory
    attention_backend: str = "auto"
    cuda_graphs: bool = True    # on CUDA: each slot's decode step is captured once and replayed per token
    chunk_by_memory: bool = False   # on CUDA: lower the chunk to what free memory holds (see fit_chunk)
    kv_dtype: str | None = None   # KV cache storage: None (the compute dtype), "int8" or "fp8"

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.cuda_graphs and self.device.type == "cuda"

    def __post_init__(self) -> None:
        if self.max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {self.max_seq_len}")
        if self.prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be positive, got {self.prefill_chunk}")
        if self.kv_dtype not in (None, "int8", "fp8"):
            raise ValueError(f"kv_dtype must be None, 'int8' or 'fp8', got {self.kv_dtype!r}")


def pick_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device (None: CUDA when available, else the CPU). chatcore runs on ``cpu`` and
    ``cuda[:N]``; anything else, or a GPU this process cannot use, raises :class:`DeviceUnavailable`."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceUnavailable(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceUnavailable(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {device!r} is not available: torch {torch.__version__} sees no CUDA GPU; "
                                "use cpu")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        visible = "cuda:0" if count == 1 else f"cuda:0..cuda:{count - 1}"
        raise DeviceUnavailable(f"device {device!r} is not available: {count} CUDA GPU{'s' * (count != 1)} "
                                f"visible ({visible})")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` as a torch dtype (None: bfloat16 on CUDA, else float32); anything but float32, float16 and
    bfloat16 (or their short names) raises :class:`LoadOptionError`."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise LoadOptionError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}")


def activation_bytes_per_token(hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> int:
    """Memory a prompt token's activations take at the peak of a forward pass: the MLP's gate/up output and
    its product (3 x intermediate) and about eight hidden-sized tensors (residual, norm, q/k/v, attention
    output). Measured on the H100: 4.38 GiB for a 32k-token chunk of Llama-3.1-8B, 143 KB a token; this
    gives 152 KB."""
    return torch.tensor([], dtype=dtype).element_size() * (3 * intermediate_size + 8 * hidden_size)


def fit_chunk(largest: int, budget_bytes: int, per_token: int, smallest: int = 512) -> int:
    """The prefill chunk: ``largest`` when its activations fit ``budget_bytes``, else the largest power of two
    that does, never below ``smallest`` (a small GPU still runs, chunk by chunk)."""
    if largest * per_token <= budget_bytes:
        return largest
    chunk = smallest
    while chunk * 2 <= largest and chunk * 2 * per_token <= budget_bytes:
        chunk *= 2
    return min(chunk, largest)
