"""What a cold long prefill costs at best, measured part by part (GPU): the matrix products of one layer,
and the causal attention of the whole prompt through every kernel this machine has, one pass and in chunks.

Usage (on the GPU machine): python bench/prefill_floor.py --out DIR [--model llama-3.1-8b] [--tokens 32768]

The model's prefill is ``layers x (projections + attention)`` plus small element-wise kernels; the floor
printed last is ``layers x (fastest projections + fastest attention)``, what no schedule of the same kernels
beats. Attention FLOPs count only visible (causal) scores: 4 * D * Hq * sum over queries of visible keys.
Writes DIR/prefill_floor.json.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from chatcore.layers.timing import event_seconds

SHAPES = {   # hidden, heads, kv heads, head dim, MLP, layers
    "llama-3.1-8b": (4096, 32, 8, 128, 14336, 32),
    "llama-3.2-1b": (2048, 32, 8, 64, 8192, 16),
}


def cuda_ms(fn: Callable[[], object], reps: int = 5) -> float:
    """Median milliseconds of ``fn`` (events around each call, after one warm-up)."""
    return 1e3 * event_seconds(fn, reps)


def causal_flops(t: int, s: int, hq: int, d: int) -> float:
    """Queries s-t .. s-1 over keys 0..own position (bottom-right causal): 2 products of 2 FLOPs per pair."""
    visible = sum(range(s - t + 1, s + 1))
    return 4.0 * d * hq * visible


def attention_kernels(tokens: int, hq: int, hkv: int, d: int, chunk: int) -> dict[str, Callable[[], object]]:
    """Each way this machine can run the prompt's causal attention (one layer), keyed by name."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    q = torch.randn(tokens, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(tokens, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    rep = hq // hkv
    kx, vx = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)   # GQA expanded for kernels without it

    def sdpa(backend: SDPBackend, keys: torch.Tensor, values: torch.Tensor, gqa: bool) -> Callable[[], object]:
        def run() -> object:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qh, keys, values, is_causal=True, enable_gqa=gqa)
        return run

    def sdpa_chunked(backend: SDPBackend, keys: torch.Tensor, values: torch.Tensor, gqa: bool) -> Callable[[], object]:
        def run() -> None:
            with sdpa_kernel([backend]):
                for i in range(0, tokens, chunk):
                    end = min(tokens, i + chunk)
                    mask = causal_lower_right(end - i, end) if i else None
                    F.scaled_dot_product_attention(qh[:, :, i:end], keys[:, :, :end], values[:, :, :end],
                                                   attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return run

    kernels: dict[str, Callable[[], object]] = {
        "sdpa flash, GQA": sdpa(SDPBackend.FLASH_ATTENTION, kh, vh, True),
        "sdpa cudnn, GQA": sdpa(SDPBackend.CUDNN_ATTENTION, kh, vh, True),
        "sdpa cudnn, K/V repeated": sdpa(SDPBackend.CUDNN_ATTENTION, kx, vx, False),
        "sdpa cudnn, GQA, head-major K/V": sdpa(SDPBackend.CUDNN_ATTENTION, kh.contiguous(), vh.contiguous(), True),
        "sdpa efficient, GQA": sdpa(SDPBackend.EFFICIENT_ATTENTION, kh, vh, True),
        f"sdpa flash, chunks of {chunk}": sdpa_chunked(SDPBackend.FLASH_ATTENTION, kh, vh, True),
        f"sdpa cudnn, chunks of {chunk}": sdpa_chunked(SDPBackend.CUDNN_ATTENTION, kx, vx, False),
        f"sdpa efficient, chunks of {chunk}": sdpa_chunked(SDPBackend.EFFICIENT_ATTENTION, kh, vh, True),
    }
    try:
        from flash_attn import flash_attn_func, flash_attn_with_kvcache
    except ImportError:
        return kernels

    def fa_chunks(with_cache: bool) -> Callable[[], None]:
        def run() -> None:
            for i in range(0, tokens, chunk):
                end = min(tokens, i + chunk)
                fn = flash_attn_with_kvcache if with_cache and i else flash_attn_func
                fn(q[None, i:end], k[None, :end], v[None, :end], causal=True)
        return run

    kernels["flash-attn func"] = lambda: flash_attn_func(q[None], k[None], v[None], causal=True)
    kernels[f"flash-attn func, chunks of {chunk}"] = fa_chunks(False)
    kernels[f"flash-attn kvcache, chunks of {chunk}"] = fa_chunks(True)
    return kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--model", default="llama-3.1-8b", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=4096)
    args = ap.parse_args()
    hidden, hq, hkv, d, inter, layers = SHAPES[args.model]
    t = args.tokens
    torch.manual_seed(0)
    res: dict[str, object] = {"model": args.model, "tokens": t, "device": torch.cuda.get_device_name()}

    x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
    mlp_in = torch.randn(t, inter, device="cuda", dtype=torch.bfloat16)
    projections = {"qkv": (x, (hq + 2 * hkv) * d), "o": (x, hidden), "gate_up": (x, 2 * inter),
                   "down": (mlp_in, hidden)}
    linear_ms = {}
    for name, (inp, out) in projections.items():
        w = torch.randn(out, inp.shape[1], device="cuda", dtype=torch.bfloat16) * 0.02
        ms = cuda_ms(lambda inp=inp, w=w: F.linear(inp, w))
        linear_ms[name] = ms
        print(f"{name:8s} [{t}x{inp.shape[1]}] @ [{inp.shape[1]}x{out}]: {ms:7.2f} ms  "
              f"{2 * t * inp.shape[1] * out / ms / 1e9:6.0f} TFLOP/s", flush=True)
        del w
    layer_linear = sum(linear_ms.values())
    del x, mlp_in
    torch.cuda.empty_cache()

    flops = causal_flops(t, t, hq, d)
    attn_ms: dict[str, float | str] = {}
    for name, fn in attention_kernels(t, hq, hkv, d, args.chunk).items():
        try:
            ms = cuda_ms(fn)
        except RuntimeError as exc:   # a backend that does not take this shape here
            attn_ms[name] = f"unavailable: {str(exc).splitlines()[0][:120]}"
            print(f"{name:36s} {attn_ms[name]}", flush=True)
            continue
        attn_ms[name] = ms
        print(f"{name:36s} {ms:8.2f} ms  {flops / ms / 1e9:6.0f} TFLOP/s", flush=True)
    timed = {k: v for k, v in attn_ms.items() if isinstance(v, float)}
    best = min(timed, key=timed.get)
    floor = layers * (layer_linear + timed[best])
    res.update(linear_ms=linear_ms, attention_ms=attn_ms, attention_tflop=flops / 1e12, layers=layers,
               floor_s=floor / 1e3, best_attention=best)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_floor.json").write_text(json.dumps(res, indent=1))
    print(f"\n{args.model}, {t} tokens: projections {layers} x {layer_linear:.1f} ms = "
          f"{layers * layer_linear / 1e3:.3f} s; "
          f"attention ({best}) {layers} x {timed[best]:.1f} ms = {layers * timed[best] / 1e3:.3f} s; "
          f"floor {floor / 1e3:.3f} s")


if __name__ == "__main__":
    main()
