"""The quantized KV cache's number format: one scale per token per head, codes int8 or float8 (e4m3).

A row ``x`` (one head's key or value of one token, ``head_dim`` elements) is stored as codes ``c`` and a float32
scale ``s = amax(|x|) / QMAX`` (QMAX: 127 for int8, 448 for e4m3, the format's largest finite value); the
value it stands for is ``c * s``. int8 codes are ``x / s`` rounded half away from zero; e4m3 codes ``x / s``
rounded to nearest even (torch's conversion, and the GPU's). A zero row gets scale 0 and codes 0, never NaN.
The Triton decode kernel (:mod:`chatcore.layers.triton_decode`) quantizes the new token's rows with these
same operations, so a row it appends holds the codes this module computes.

Memory per token and head: ``D`` code bytes and 4 scale bytes, (D + 4) / (2 D) of a bfloat16 row.
"""

from __future__ import annotations

import torch

from chatcore.errors import LoadOptionError

KV_DTYPES: dict[str, torch.dtype] = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX: dict[torch.dtype, float] = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def code_dtype(kv_dtype: str) -> torch.dtype:
    """The torch dtype of the codes of ``kv_dtype`` ("int8" or "fp8")."""
    if kv_dtype not in KV_DTYPES:
        raise LoadOptionError(f"unsupported KV cache dtype {kv_dtype!r}; use int8 or fp8 (or leave it out)")
    return KV_DTYPES[kv_dtype]


def check_kv_dtype(kv_dtype: str | None, device: torch.device) -> None:
    """Refuse a KV cache dtype the device cannot run: fp8 needs a GPU of compute capability 8.9 or more (the
    Triton decode kernel converts e4m3 in hardware there) or the CPU."""
    if kv_dtype is None:
        return
    code_dtype(kv_dtype)
    if kv_dtype == "fp8" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise LoadOptionError(f"kv_dtype 'fp8' needs a GPU of compute capability 8.9 or more (this one is "
                                  f"{major}.{minor}); use kv_dtype 'int8'")


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [..., D] (any float dtype) -> codes [..., D] in ``dtype`` (int8 or float8_e4m3fn) and float32
    scales [...]; ``dequantize(codes, scales)`` gives them back within half a code step of each row's scale."""
    qmax = QMAX[dtype]
    xf = x.float()
    scale = xf.abs().amax(-1) / qmax
    y = (xf / torch.where(scale > 0, scale, 1.0)[..., None]).clamp(-qmax, qmax)
    if dtype == torch.int8:
        codes = (y + torch.where(y >= 0, 0.5, -0.5)).to(torch.int8)   # the conversion truncates toward zero
    else:
        codes = y.to(dtype)
    return codes, scale


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., D] and scales [...] -> the values ``codes * scales`` they stand for, in ``dtype``."""
    return (codes.float() * scales[..., None]).to(dtype)


def copy_rows(dst: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.index_copy_(dim, index, src)`` for any dtype (the CPU has no index_copy for float8: its bytes)."""
    if dst.dtype == torch.float8_e4m3fn:
        dst, src = dst.view(torch.uint8), src.view(torch.uint8)
    dst.index_copy_(dim, index, src)
