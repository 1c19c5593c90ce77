"""The attention entry point: one function per mode, each with backends that compute the same function.

Layout: queries ``q`` [T, Hq, D] of the T newest tokens of one sequence; keys and values head-major
[Hkv, S, D] (the KV cache's layout). Attention is causal and bottom-right aligned: the query at position p
sees keys 0 .. p. Hq must be a multiple of Hkv (GQA). Scores are scaled by 1/sqrt(D).

Modes:
- :func:`attend_chunk`: T new tokens after ``start`` cached ones, positions known on the host (prompt
  chunks, and decode without CUDA graphs); ``k``/``v`` hold every key up to the chunk's last
  (S = start + T), and query i sits at position start + i. Keys that no query can see (older than every
  query's window) are cut off before any backend runs, so one token with a window reads ``window`` keys.
- :func:`attend_decode`: one new token at a position held in device memory (int32 [1]) over a static cache
  (what a CUDA graph captures): ``k_cache``/``v_cache`` are whole cache buffers [Hkv, capacity, D] and
  ``new_kv`` the new token's key and value [1, Hkv, D]. It rotates q and the new key at that position
  (``rotary``: full cos/sin tables [positions, D/2]), writes key and value into the cache there, and attends
  over keys 0 .. position. Nothing reads the position on the host, so the step can be replayed at any length.
  A quantized cache (``scales``: float32 key and value scales [Hkv, capacity], the caches then int8 or
  float8_e4m3fn codes; :mod:`chatcore.layers.kv_quant`) gets the new key and value quantized.

Options, honoured by every backend in both modes:
- ``window``: sliding-window attention (Mistral): the query at p sees only keys p - window < j <= p
  (transformers' ``sliding_window``);
- ``alibi``: ALiBi slopes [Hq] (float32): ``slope[h] * (j - p)`` is added to the scores (flash-attn's
  ``alibi_slopes`` bias; the reference models' differs by a per-row constant);
- ``sinks`` (decode only; triton, torch and math): with a window, the first ``sinks`` keys stay visible too.

Backends:
- ``flash``: flash-attn's kernels (GPU, fp16/bf16), used automatically when the package imports; a decode
  step is one kernel (``flash_attn_with_kvcache`` with in-kernel rotary and ``cache_seqlens``);
- ``triton``: for GPUs without flash-attn, the project's own kernels: a FlashAttention-2 forward for prompt
  chunks (:mod:`chatcore.layers.triton_prefill`; on the CPU, where it runs only under Triton's interpreter,
  chunks take PyTorch's SDPA instead) and split-K for one token (:mod:`chatcore.layers.triton_decode`, which
  in decode mode also rotates and appends, in the same launch);
- ``torch``: PyTorch's scaled_dot_product_attention (any device);
- ``math``: plain float32 softmax attention, the reference the others are tested against.
On a GPU, the first chunk of a prompt without ALiBi or a window takes cuDNN's SDPA kernel under flash and
triton too, where cuDNN takes the shape (faster there than either: ``bench/README.md``, "chatcore/layers").

A quantized KV cache (``kv_dtype`` int8 / fp8): prompt chunks get the dequantized keys and values from the
cache's write (every backend's chunk path, the triton prefill kernel included, runs as on a float cache). In
decode mode the triton kernel reads the codes and scales directly (half the bytes of bf16: the bandwidth a
long context's decode step is bound by) and quantizes the new token's key and value in the same launch;
torch and math quantize the new rows, then dequantize the cache and attend as before. flash-attn 2 has no
quantized cache, so under ``flash`` a quantized cache's decode step takes the triton kernel.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings

import torch
import torch.nn.functional as F

from chatcore.layers.kv_quant import copy_rows, dequantize, quantize
from chatcore.layers.rope import Rotary

BACKENDS = ("flash", "triton", "torch", "math")
_MASK_BYTES = 256 * 2**20   # largest ALiBi bias one SDPA call materialises
# where the triton backend runs prompt chunks with ALiBi or a window through its own kernel; not under the CPU
# interpreter, where the kernel is correct but slow (tests/test_triton_prefill.py runs it there directly)
_PREFILL_KERNEL_DEVICES = ("cuda",)

Offset = int | torch.Tensor   # the first query's position: known on the host, or held on the device (int32 [1])
Tables = tuple[torch.Tensor, torch.Tensor]   # RoPE cos and sin [positions, D/2]


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def triton_available(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, and on the CPU under Triton's interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def pick_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve ``auto`` to the best backend for a device and dtype; check an explicit choice."""
    if requested == "auto":
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_available():
            return "flash"
        if device.type == "cuda" and triton_available(device):
            return "triton"
        return "torch"
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose from auto, {', '.join(BACKENDS)}")
    if requested == "flash" and not (device.type == "cuda" and flash_available()):
        raise ValueError("attention backend 'flash' needs a CUDA device and the flash-attn package")
    if requested == "triton" and not triton_available(device):
        raise ValueError("attention backend 'triton' needs a CUDA device and the triton package "
                         "(or TRITON_INTERPRET=1 on the CPU)")
    return requested


def sized_by_buffer(backend: str) -> bool:
    """Whether the backend's static-cache decode costs what the cache buffer holds rather than what is live
    (flash-attn sizes its key split from the buffer, torch and math mask all of it; triton reads the length
    on the device). Such backends attend over a span of the cache that just holds the position
    (:mod:`chatcore.cuda_graph`)."""
    return backend != "triton"


def attend_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start: int, backend: str,
                 sliding_window: int | None = None, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of T new queries q [T, Hq, D] (positions start .. start + T - 1) over k/v
    [Hkv, start + T, D]; returns [T, Hq, D]. ``window``: sliding-window size (None: full attention);
    ``alibi``: ALiBi slopes [Hq] (None: no bias)."""
    _check_window(sliding_window)
    if sliding_window is not None:
        cut = start + 1 - sliding_window  # keys before this are outside every query's window
        if cut > 0:
            k, v, start = k[:, cut:], v[:, cut:], start - cut
        if start + q.shape[0] <= sliding_window:
            sliding_window = None  # nothing left for the window to hide
    return _CHUNK[backend](q, k, v, start, sliding_window, alibi)


def attend_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, pos: torch.Tensor,
                  new_kv: tuple[torch.Tensor, torch.Tensor], backend: str, sliding_window: int | None = None,
                  alibi: torch.Tensor | None = None, sinks: int = 0, rotary: Tables | None = None,
                  scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One new query q [1, Hq, D] at position ``pos`` (int32 [1], on the device) over a static cache
    ``k_cache``/``v_cache`` [Hkv, capacity, D] that holds keys 0 .. pos - 1: rotates q and the new key
    (``new_kv``: key and value [1, Hkv, D], the key not rotated) with ``rotary`` (None: no RoPE), writes key
    and value into the cache at ``pos`` and attends over keys 0 .. pos; returns [1, Hq, D].
    ``window``, ``alibi`` as for :func:`attend_chunk`; ``sinks``: keys kept visible beside the window;
    ``scales``: a quantized cache's key and value scales [Hkv, capacity] (the caches hold the codes).
    ``rotary`` tables are float32, or in q's dtype for ``flash`` on a float cache (its in-kernel rotary)."""
    _check_window(sliding_window)
    if q.shape[0] != 1:
        raise ValueError(f"decode on a static cache takes one query, got {q.shape[0]}")
    slopes = None if alibi is None else alibi.to(device=q.device, dtype=torch.float32)
    if scales is not None and backend == "flash":
        backend = "triton"   # flash-attn has no quantized cache: the triton kernel reads codes and scales
    return _DECODE[backend](q, k_cache, v_cache, pos, new_kv, rotary, sliding_window, slopes, sinks, scales)


def _check_window(sliding_window: int | None) -> None:
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding window must be positive, got {sliding_window}")


# ---- masks and biases (torch and math backends)

def _causal_mask(t: int, s: int, offset: Offset, device: torch.device, sliding_window: int | None = None,
                 sinks: int = 0) -> torch.Tensor:
    """[T, S] bool: True where query i (at offset + i) may see key j."""
    rows = torch.arange(t, device=device)[:, None] + offset
    cols = torch.arange(s, device=device)[None, :]
    visible = cols <= rows
    if sliding_window is not None:
        visible &= (cols > rows - sliding_window) | (cols < sinks)
    return visible


def _alibi_bias(slopes: torch.Tensor, t: int, s: int, offset: Offset, device: torch.device) -> torch.Tensor:
    """[H, T, S] float32: slope * (j - (offset + i)) for query i and key j."""
    rel = torch.arange(s, device=device)[None, :] - (torch.arange(t, device=device)[:, None] + offset)
    return slopes.to(device=device, dtype=torch.float32)[:, None, None] * rel.to(torch.float32)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: Offset, sliding_window: int | None,
          alibi: torch.Tensor | None, sinks: int = 0) -> torch.Tensor:
    """The reference, in float32: q [T, Hq, D] at offset .. over k/v [Hkv, S, D] (both modes)."""
    t, hq, d = q.shape
    hkv, s, _ = k.shape
    rep = hq // hkv
    kf = k.float().repeat_interleave(rep, dim=0)
    vf = v.float().repeat_interleave(rep, dim=0)
    scores = torch.einsum("thd,hsd->hts", q.float(), kf) / math.sqrt(d)
    if alibi is not None:
        scores = scores + _alibi_bias(alibi, t, s, offset, q.device)
    scores = scores.masked_fill(~_causal_mask(t, s, offset, q.device, sliding_window, sinks), float("-inf"))
    out = torch.einsum("hts,hsd->thd", scores.softmax(-1), vf)
    return out.to(q.dtype)


# ---- chunk mode: one function per backend, (q, k, v, start, window, alibi) -> [T, Hq, D]

def _fresh_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Plain causal attention of a prompt from position 0 on a GPU (GQA native), or None where no fused kernel
    takes it: PyTorch's SDPA with cuDNN's kernel first, then its flash kernel. cuDNN has no bottom-right causal
    mask for a chunk over a longer cache, so only the first chunk takes it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hq, hkv = q.shape[1], k.shape[0]
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # "cuDNN attention kernel not used because ...": flash runs
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], is_causal=True,
                                                 enable_gqa=hq != hkv)
    except RuntimeError:
        return None
    return out[0].transpose(0, 1)


def _chunk_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, sliding_window: int | None,
                 alibi: torch.Tensor | None) -> torch.Tensor:
    t, hq, d = q.shape
    hkv, s, _ = k.shape
    if t == 1 and alibi is None:
        # One token: every key is visible (the window was cut before), so each KV head's query group is a
        # batch of rows over it (no repeated K/V, no mask; on the CPU faster than enable_gqa).
        out = F.scaled_dot_product_attention(q.view(1, hkv, hq // hkv, d), k[None], v[None])
        return out.reshape(1, hq, d)
    qh = q.transpose(0, 1)
    if q.is_cuda and alibi is None and sliding_window is None:
        fresh = _fresh_causal(q, k, v) if start == 0 else None
        if fresh is not None:
            return fresh
        # GPU prompt chunk on top of a cache: the flash SDPA kernel with native GQA, causal aligned bottom-right
        # (no mask tensor, no repeated K/V, memory bounded by the chunk)
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(t, s) if start else None
        try:
            out = F.scaled_dot_product_attention(qh[None], k[None], v[None], attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=hq != hkv)
            return out[0].transpose(0, 1)
        except RuntimeError:   # no fused kernel takes this shape on this GPU: the general path below
            pass
    if hq != hkv:
        # Prefill: explicit K/V repeat keeps SDPA on its fused (flash) kernels; with enable_gqa the CPU
        # build falls back to its unfused math path.
        k, v = k.repeat_interleave(hq // hkv, dim=0), v.repeat_interleave(hq // hkv, dim=0)
    # 4-D inputs: SDPA's fused CPU kernel takes only [batch, heads, tokens, dim].
    if alibi is not None and t > 1 and hq * t * s * 4 > _MASK_BYTES:
        # an ALiBi bias is a [H, T, S] tensor: split the queries so that it stays small (memory bounded)
        half = t // 2
        return torch.cat([_chunk_torch(q[:half], k[:, : start + half], v[:, : start + half], start,
                                       sliding_window, alibi),
                          _chunk_torch(q[half:], k, v, start + half, sliding_window, alibi)])
    mask: torch.Tensor | None = None
    if alibi is not None:
        bias = _alibi_bias(alibi, t, s, start, q.device)
        mask = bias.masked_fill(~_causal_mask(t, s, start, q.device, sliding_window), float("-inf")).to(q.dtype)
    elif start != 0 or sliding_window is not None:
        mask = _causal_mask(t, s, start, q.device, sliding_window)
    if mask is not None:
        mask = mask.view(1, -1, t, s)   # 4-D too: a 3-D mask sends the CPU kernel down its slow path
    out = F.scaled_dot_product_attention(qh[None], k[None], v[None], attn_mask=mask, is_causal=mask is None)
    return out[0].transpose(0, 1)


def _chunk_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, sliding_window: int | None,
                 alibi: torch.Tensor | None) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_with_kvcache

    if start > 0:
        # a chunk on top of a cache: the KV-cache kernel splits the long key range across blocks (few query
        # blocks alone would leave most of the GPU idle: a 256-token turn on a 32k history); same alignment
        return flash_attn_with_kvcache(
            q[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], causal=True,
            window_size=(-1, -1) if sliding_window is None else (sliding_window - 1, 0),
            alibi_slopes=None if alibi is None else alibi.to(device=q.device, dtype=torch.float32))[0]

    if sliding_window is None and alibi is None:
        fresh = _fresh_causal(q, k, v)   # cuDNN's Hopper kernel is faster than flash-attn 2's for a whole prompt
        if fresh is not None:
            return fresh
    # flash-attn aligns the causal mask bottom-right when seqlen_q != seqlen_k, as we need; its window
    # (left, right) counts keys before the query's own, and its ALiBi bias is -slope * |i - j| (bottom-right).
    return flash_attn_func(q[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], causal=True,
                           window_size=(-1, -1) if sliding_window is None else (sliding_window - 1, 0),
                           alibi_slopes=None if alibi is None else alibi.to(device=q.device, dtype=torch.float32))[0]


def _chunk_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, sliding_window: int | None,
                  alibi: torch.Tensor | None) -> torch.Tensor:
    if q.shape[0] > 1:
        if q.device.type not in _PREFILL_KERNEL_DEVICES:
            return _chunk_torch(q, k, v, start, sliding_window, alibi)
        if start == 0 and alibi is None and sliding_window is None:
            fresh = _fresh_causal(q, k, v)   # cuDNN: faster still for a whole prompt
            if fresh is not None:
                return fresh
        from chatcore.layers.triton_prefill import prefill_attention

        return prefill_attention(q, k, v, start, sliding_window=sliding_window, alibi=alibi)
    from chatcore.layers.triton_decode import decode_attention

    pos = torch.full((1,), start, dtype=torch.int32, device=q.device)
    slopes = None if alibi is None else alibi.to(device=q.device, dtype=torch.float32)
    return decode_attention(q[0], k, v, pos, sliding_window=sliding_window, alibi=slopes)[None]


_CHUNK = {"flash": _chunk_flash, "triton": _chunk_triton, "torch": _chunk_torch, "math": _math}


# ---- decode mode: one function per backend, (q, k_cache, v_cache, pos, new_kv, rotary, window, slopes, sinks,
# scales) -> [1, Hq, D]; ``slopes`` already float32 on q's device; ``scales`` None or a quantized cache's

def _rotary_at(rotary: Tables, pos: torch.Tensor, dtype: torch.dtype) -> Tables:
    cos, sin = (x.index_select(0, pos)[:, None, :].to(dtype) for x in rotary)
    return cos, sin


def _append(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
            new_kv: tuple[torch.Tensor, torch.Tensor], rotary: Tables | None,
            scales: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotates q and the new key at ``pos``, writes key and value into the caches there (quantized, with
    ``scales``); returns q rotated and the keys and values to attend over (dequantized copies when quantized)."""
    k_new, v_new = new_kv
    if rotary is not None:
        cos, sin = _rotary_at(rotary, pos, q.dtype)
        q, k_new = Rotary.apply(q, cos, sin), Rotary.apply(k_new, cos, sin)
    index = pos.long()
    if scales is None:
        k_cache.index_copy_(1, index, k_new.transpose(0, 1))
        v_cache.index_copy_(1, index, v_new.transpose(0, 1))
        return q, k_cache, v_cache
    out = []
    for cache, scale, x in ((k_cache, scales[0], k_new), (v_cache, scales[1], v_new)):
        codes, sc = quantize(x.transpose(0, 1), cache.dtype)
        copy_rows(cache, 1, index, codes)
        scale.index_copy_(1, index, sc)
        out.append(dequantize(cache, scale, q.dtype))
    return q, out[0], out[1]


def _decode_flash(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                  new_kv: tuple[torch.Tensor, torch.Tensor], rotary: Tables | None, sliding_window: int | None,
                  slopes: torch.Tensor | None, sinks: int,
                  scales: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    from flash_attn import flash_attn_with_kvcache

    if scales is not None:   # attend_decode sends a quantized cache to the triton kernel
        raise ValueError("flash-attn has no quantized KV cache")
    if sinks:
        raise ValueError("flash-attn has no attention sinks; use the triton or torch backend")
    k_new, v_new = new_kv
    if rotary is not None and rotary[0].shape[1] % 8:   # flash-attn rotates only dims divisible by 16
        cos, sin = _rotary_at(rotary, pos, q.dtype)
        q, k_new, rotary = Rotary.apply(q, cos, sin), Rotary.apply(k_new, cos, sin), None
    cos, sin = rotary if rotary is not None else (None, None)
    return flash_attn_with_kvcache(
        q[None], k_cache.transpose(0, 1)[None], v_cache.transpose(0, 1)[None], k=k_new[None], v=v_new[None],
        rotary_cos=cos, rotary_sin=sin, cache_seqlens=pos, causal=True, rotary_interleaved=False,
        window_size=(-1, -1) if sliding_window is None else (sliding_window - 1, 0), alibi_slopes=slopes)[0]


def _decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                   new_kv: tuple[torch.Tensor, torch.Tensor], rotary: Tables | None, sliding_window: int | None,
                   slopes: torch.Tensor | None, sinks: int,
                   scales: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    from chatcore.layers.triton_decode import decode_attention

    # one launch rotates q and the new key, appends key and value (quantized, on a quantized cache), and
    # attends (then the splits' merge)
    k_new, v_new = new_kv
    return decode_attention(q[0], k_cache, v_cache, pos, new_kv=(k_new[0], v_new[0]), rotary=rotary,
                            sliding_window=sliding_window, sinks=sinks, alibi=slopes, scales=scales)[None]


def _decode_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                  new_kv: tuple[torch.Tensor, torch.Tensor], rotary: Tables | None, sliding_window: int | None,
                  slopes: torch.Tensor | None, sinks: int,
                  scales: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    q, k_cache, v_cache = _append(q, k_cache, v_cache, pos, new_kv, rotary, scales)
    s = k_cache.shape[1]
    mask = _causal_mask(1, s, pos, q.device, sliding_window, sinks)[None]
    bias = mask if slopes is None else _alibi_bias(slopes, 1, s, pos, q.device).masked_fill(
        ~mask, float("-inf")).to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k_cache[None], v_cache[None],
                                         attn_mask=bias.view(1, -1, 1, s), enable_gqa=q.shape[1] != k_cache.shape[0])
    return out[0].transpose(0, 1)


def _decode_math(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                 new_kv: tuple[torch.Tensor, torch.Tensor], rotary: Tables | None, sliding_window: int | None,
                 slopes: torch.Tensor | None, sinks: int,
                 scales: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    q, k_cache, v_cache = _append(q, k_cache, v_cache, pos, new_kv, rotary, scales)
    return _math(q, k_cache, v_cache, pos, sliding_window, slopes, sinks)


_DECODE = {"flash": _decode_flash, "triton": _decode_triton, "torch": _decode_torch, "math": _decode_math}
