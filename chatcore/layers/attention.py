"""The one attention entry point, with backends that compute the same function.

Shapes: ``q`` is [T, Hq, D] for the T newest tokens of one sequence; ``k`` and ``v`` are [Hkv, S, D]
(head-major, the KV cache's layout), holding every key up to and including those T tokens
(S = q_offset + T). Attention is causal
and bottom-right aligned: query i sees keys 0 .. q_offset + i. Hq must be a multiple of Hkv (GQA).

Options, honoured by every backend:
- ``window``: sliding-window attention (Mistral): query i sees only the ``window`` newest keys up to
  itself, q_offset + i - window < j <= q_offset + i (transformers' ``sliding_window``);
- ``alibi``: ALiBi slopes [Hq] (float32): ``slope[h] * (j - (q_offset + i))`` is added to the scores
  (flash-attn's ``alibi_slopes`` bias; the reference models' differs by a per-row constant).

Backends:
- ``flash``: flash-attn's kernels (GPU, fp16/bf16), used automatically when the package imports;
- ``torch``: PyTorch's scaled_dot_product_attention (any device);
- ``math``: plain float32 softmax attention, the reference the others are tested against.

Keys that no query can see (older than every query's window) are cut off before any backend runs, so a
decode step with a window reads only ``window`` keys.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

BACKENDS = ("flash", "torch", "math")


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def pick_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve ``auto`` to the best backend for a device and dtype; check an explicit choice."""
    if requested == "auto":
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_available():
            return "flash"
        return "torch"
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose from auto, {', '.join(BACKENDS)}")
    if requested == "flash" and not (device.type == "cuda" and flash_available()):
        raise ValueError("attention backend 'flash' needs a CUDA device and the flash-attn package")
    return requested


def _causal_mask(t: int, s: int, q_offset: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """[T, S] bool: True where query i may see key j."""
    rows = torch.arange(t, device=device)[:, None] + q_offset
    cols = torch.arange(s, device=device)[None, :]
    visible = cols <= rows
    if window is not None:
        visible &= cols > rows - window
    return visible


def _alibi_bias(slopes: torch.Tensor, t: int, s: int, q_offset: int, device: torch.device) -> torch.Tensor:
    """[H, T, S] float32: slope * (j - i) for query i (at q_offset + i) and key j."""
    rel = torch.arange(s, device=device)[None, :] - (torch.arange(t, device=device)[:, None] + q_offset)
    return slopes.to(device=device, dtype=torch.float32)[:, None, None] * rel.to(torch.float32)


def _torch_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, window: int | None,
                alibi: torch.Tensor | None) -> torch.Tensor:
    t, hq, d = q.shape
    hkv, s, _ = k.shape
    if t == 1 and alibi is None:
        # Decode: every key is visible (the window was cut before), so each KV head's query group is a
        # batch of rows over it (no repeated K/V, no mask): several times faster than enable_gqa on the CPU.
        out = F.scaled_dot_product_attention(q.view(1, hkv, hq // hkv, d), k[None], v[None])
        return out.reshape(1, hq, d)
    qh = q.transpose(0, 1)
    if hq != hkv:
        # Prefill: explicit K/V repeat keeps SDPA on its fused (flash) kernels; with enable_gqa the CPU
        # build falls back to the unfused math path, twice as slow.
        k, v = k.repeat_interleave(hq // hkv, dim=0), v.repeat_interleave(hq // hkv, dim=0)
    # 4-D inputs: SDPA's fused CPU kernel takes only [batch, heads, tokens, dim].
    mask: torch.Tensor | None = None
    if alibi is not None:
        bias = _alibi_bias(alibi, t, s, q_offset, q.device)
        mask = bias.masked_fill(~_causal_mask(t, s, q_offset, q.device, window), float("-inf")).to(q.dtype)
    elif q_offset != 0 or window is not None:
        mask = _causal_mask(t, s, q_offset, q.device, window)
    if mask is not None:
        mask = mask.view(1, -1, t, s)   # 4-D too: a 3-D mask sends the CPU kernel down its slow path (3x)
    out = F.scaled_dot_product_attention(qh[None], k[None], v[None], attn_mask=mask, is_causal=mask is None)
    return out[0].transpose(0, 1)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, window: int | None,
          alibi: torch.Tensor | None) -> torch.Tensor:
    t, hq, d = q.shape
    hkv, s, _ = k.shape
    rep = hq // hkv
    kf = k.float().repeat_interleave(rep, dim=0)
    vf = v.float().repeat_interleave(rep, dim=0)
    scores = torch.einsum("thd,hsd->hts", q.float(), kf) / math.sqrt(d)
    if alibi is not None:
        scores = scores + _alibi_bias(alibi, t, s, q_offset, q.device)
    scores = scores.masked_fill(~_causal_mask(t, s, q_offset, q.device, window), float("-inf"))
    out = torch.einsum("hts,hsd->thd", scores.softmax(-1), vf)
    return out.to(q.dtype)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, window: int | None,
           alibi: torch.Tensor | None) -> torch.Tensor:
    from flash_attn import flash_attn_func

    # flash-attn aligns the causal mask bottom-right when seqlen_q != seqlen_k, as we need; its window
    # (left, right) counts keys before the query's own, and its ALiBi bias is -slope * |i - j| (bottom-right).
    return flash_attn_func(q[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], causal=True,
                           window_size=(-1, -1) if window is None else (window - 1, 0),
                           alibi_slopes=None if alibi is None else alibi.to(device=q.device, dtype=torch.float32))[0]


_IMPLS = {"flash": _flash, "torch": _torch_sdpa, "math": _math}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_offset: int, backend: str,
              window: int | None = None, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the T newest queries over the cached keys; returns [T, Hq, D].

    ``window``: sliding-window size (None: full attention); ``alibi``: ALiBi slopes [Hq] (None: no bias).
    """
    if window is not None:
        if window <= 0:
            raise ValueError(f"attention window must be positive, got {window}")
        cut = q_offset + 1 - window  # keys before this are outside every query's window
        if cut > 0:
            k, v, q_offset = k[:, cut:], v[:, cut:], q_offset - cut
        if q_offset + q.shape[0] <= window:
            window = None  # nothing left for the window to hide
    return _IMPLS[backend](q, k, v, q_offset, window, alibi)
