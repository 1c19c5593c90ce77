"""Decode attention over paged KV memory on the GPU: chatcore's Triton paged kernel (chatcore.layers.triton_paged)
and flash-attn's paged decode, against the same batch in contiguous caches (chatcore's Triton decode kernel, one
launch per sequence as a serial engine runs it, and flash-attn's batched decode).

Usage (on the GPU machine): python bench/paged_kernels.py --out DIR [--batches 1 8 32] [--context 4096]
    [--block-sizes 256 16] [--budget 300]

One layer of the 8B shapes (32 query heads, 8 KV heads, head dim 128, bf16): B sequences x one query, each with
``--context`` keys (the new row included). Paged pools hand each sequence shuffled blocks (block 0 is scratch).
Variants per batch size:
- ``paged_triton_bs{N}``: attend_paged's triton backend (one paged_decode: split-K + merge), block size N;
- ``paged_triton_int8_bs256`` / ``paged_triton_fp8_bs256``: the same over int8 / e4m3 codes with float32 scales;
- ``paged_flash_bs256``: flash_attn_with_kvcache with block_table (attend_paged's flash backend);
- ``contig_triton``: triton_decode.decode_attention over [Hkv, S, D] caches, B launches (one per sequence);
- ``contig_flash``: flash_attn_with_kvcache over [B, S, Hkv, D] caches with cache_seqlens.
Times are device times of calls captured in a CUDA graph (chatcore.layers.timing.graph_seconds, launch costs
out); each captured call reads another copy of the keys and values (copies for >= 200 MB in all), so the
50 MB L2 does not hold them between calls. GB/s counts the key and value bytes a call must read (codes and
scales when quantized), % against 4.2 TB/s (the H200's measured copy bandwidth). Each variant's output is
checked against contig_flash's (or, without flash-attn, paged_triton_bs256's): max abs difference recorded.
Writes DIR/paged_kernels.json (after each batch size) and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from chatcore.layers.kv_quant import quantize
from chatcore.layers.paged_attention import attend_paged
from chatcore.layers.timing import graph_seconds
from chatcore.layers.triton_decode import decode_attention

PEAK = 4.2e12
COLD_BYTES = 200e6
HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16


def paged_copy(keys: torch.Tensor, values: torch.Tensor, bs: int, seed: int, code: torch.dtype | None) -> dict:
    """keys/values [B, S, Hkv, D] scattered into a pool of block size ``bs`` through shuffled tables."""
    b, s = keys.shape[:2]
    per = -(-s // bs)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(b * per, generator=g) + 1
    tables = order.view(b, per).to(torch.int32)
    nb = b * per + 1
    out: dict[str, Any] = {"tables": tables.cuda()}
    for name, x in (("k", keys), ("v", values)):
        pad = torch.zeros(b, per * bs, HKV, D, dtype=x.dtype, device=x.device)
        pad[:, :s] = x
        pool = torch.zeros(nb, bs, HKV, D, dtype=x.dtype, device=x.device)
        pool[tables.flatten().long().cuda()] = pad.view(b * per, bs, HKV, D)
        if code is not None:
            pool, sc = quantize(pool, code)
            out[name + "_scale"] = sc
        out[name] = pool
    return out


def variants(b: int, s: int, block_sizes: list[int], have_flash: bool) -> dict[str, Callable[[int], Callable]]:
    """name -> (copy index -> a call over that copy's data); the data built once per copy, lazily."""
    g = torch.Generator(device="cuda").manual_seed(b)
    q = torch.randn(b, HQ, D, generator=g, device="cuda", dtype=DTYPE)
    lens = torch.full((b,), s, dtype=torch.int32, device="cuda")
    cu = torch.arange(b + 1, dtype=torch.int32, device="cuda")

    def contiguous(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        gi = torch.Generator(device="cuda").manual_seed(1000 * b + i)
        return tuple(torch.randn(b, s, HKV, D, generator=gi, device="cuda", dtype=DTYPE) for _ in range(2))

    def paged(bs: int, code: torch.dtype | None, backend: str) -> Callable[[int], Callable]:
        def make(i: int) -> Callable:
            k, v = contiguous(i)
            p = paged_copy(k, v, bs, i, code)
            del k, v
            scales = (p["k_scale"], p["v_scale"]) if code is not None else None
            return lambda: attend_paged(q, p["k"], p["v"], cu_q=cu, seq_lens=lens, block_tables=p["tables"], max_q=1,
                                        backend=backend, scales=scales)
        return make

    def contig_triton(i: int) -> Callable:
        k, v = contiguous(i)
        kc, vc = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()   # [B, Hkv, S, D]
        del k, v
        pos = torch.full((1,), s - 1, dtype=torch.int32, device="cuda")
        return lambda: torch.stack([decode_attention(q[j], kc[j], vc[j], pos) for j in range(b)])

    def contig_flash(i: int) -> Callable:
        from flash_attn import flash_attn_with_kvcache

        k, v = contiguous(i)
        return lambda: flash_attn_with_kvcache(q[:, None], k, v, cache_seqlens=lens, causal=True)[:, 0]

    out: dict[str, Callable[[int], Callable]] = {}
    for bs in block_sizes:
        out[f"paged_triton_bs{bs}"] = paged(bs, None, "triton")
    out["paged_triton_int8_bs256"] = paged(256, torch.int8, "triton")
    out["paged_triton_fp8_bs256"] = paged(256, torch.float8_e4m3fn, "triton")
    if have_flash:
        out["paged_flash_bs256"] = paged(256, None, "flash")
        out["contig_flash"] = contig_flash
    out["contig_triton"] = contig_triton
    return out


def _next_call(cycle: Iterator[Callable]) -> torch.Tensor:
    return next(cycle)()


def kv_bytes(name: str, b: int, s: int) -> int:
    per_elem = 1 if ("int8" in name or "fp8" in name) else 2
    scale = 4 * b * s * HKV * 2 if per_elem == 1 else 0
    return 2 * b * s * HKV * D * per_elem + scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[256, 16])
    ap.add_argument("--budget", type=float, default=300.0, help="seconds; later batch sizes are skipped after it")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    have_flash = importlib.util.find_spec("flash_attn") is not None
    t0 = time.time()
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "shapes": {"hq": HQ, "hkv": HKV, "d": D, "dtype": str(DTYPE)},
                              "context": args.context, "flash_attn": have_flash, "rows": []}
    s = args.context
    for b in args.batches:
        if time.time() - t0 > args.budget:
            print(f"budget spent: batch {b} skipped")
            continue
        for name, make in variants(b, s, args.block_sizes, have_flash).items():
            nbytes = kv_bytes(name, b, s)
            copies = max(1, math.ceil(COLD_BYTES / nbytes))
            calls = [make(i) for i in range(copies)]
            torch.cuda.synchronize()
            sec = graph_seconds(partial(_next_call, itertools.cycle(calls)), reps=max(20, copies))
            got = calls[0]().float()
            del calls
            result["rows"].append({"variant": name, "batch": b, "context": s, "us": sec * 1e6,
                                   "GBps": nbytes / sec / 1e9, "pct_peak": 100 * nbytes / sec / PEAK,
                                   "out": got})
            torch.cuda.empty_cache()
        # accuracy against contig_flash (else the bf16 paged triton kernel)
        rows = [r for r in result["rows"] if r["batch"] == b]
        ref = next((r["out"] for r in rows if r["variant"] == "contig_flash"), rows[0]["out"])
        for r in rows:
            r["max_abs_diff"] = (r.pop("out") - ref).abs().max().item()
        (args.out / "paged_kernels.json").write_text(json.dumps(result, indent=1))
    print(f"{'variant':26s} {'B':>3s} {'us':>9s} {'GB/s':>8s} {'%peak':>6s} {'maxdiff':>8s}")
    for r in result["rows"]:
        print(f"{r['variant']:26s} {r['batch']:3d} {r['us']:9.1f} {r['GBps']:8.0f} {r['pct_peak']:6.1f} "
              f"{r['max_abs_diff']:8.4f}")
    (args.out / "paged_kernels.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
