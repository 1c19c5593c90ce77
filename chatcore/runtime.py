"""Runtime choices for a loaded model: where it runs and how big its caches may grow."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    max_seq_len: int            # tokens a cache slot may hold (the context window in use)
    prefill_chunk: int = 512    # prompt tokens per forward pass; bounds activation memory
    attention_backend: str = "auto"
    cuda_graphs: bool = True    # on CUDA: each slot's decode step is captured once and replayed per token
    chunk_by_memory: bool = False   # on CUDA: lower the chunk to what free memory holds (see fit_chunk)

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.cuda_graphs and self.device.type == "cuda"

    def __post_init__(self) -> None:
        if self.max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {self.max_seq_len}")
        if self.prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be positive, got {self.prefill_chunk}")


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None


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
