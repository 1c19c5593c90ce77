"""Prompt (prefill) attention kernels on the GPU: the project's Triton kernel vs flash-attn vs PyTorch SDPA.

Usage (on the GPU machine): python bench/prefill_kernels.py [--tokens 32768] [--chunk 4096] [--warm 256]
    [--shapes bloom-1b7 llama-3.1-8b llama-3.1-8b-window] [--sweep] [--reps 5]
       python bench/prefill_kernels.py --ptxas     (any machine: what ptxas makes of each launch shape for sm_90)

One layer's attention for a whole prompt of ``--tokens`` tokens prefilled in chunks of ``--chunk``, each
chunk on top of the cache the earlier ones filled (q_offset = 0, chunk, 2 chunk, ..), k/v as views of a
head-major cache [Hkv, capacity, D] as the engine holds it; bf16, random inputs. Per shape and kernel: the
summed time of all chunks (median of ``--reps`` runs, CUDA events) and TFLOP/s, counting only the work causal
attention needs: 4 * D * Hq * (the number of keys each query row sees, summed over rows).

Rows: ``triton-kernel`` (chatcore.layers.triton_prefill, default launch shape); ``flash`` (the attention
entry point's flash backend: flash_attn_func for the first chunk, flash_attn_with_kvcache on a cache; when
flash-attn imports); ``torch-sdpa`` (the entry point's torch backend, what the triton backend ran before: SDPA
with a materialised ALiBi bias or mask, PyTorch's flash kernel for plain causal chunks). ``--warm N``: also
one chunk of N tokens on a cache holding the rest of the prompt (a chat turn), where the kernel splits the key
range (split-KV; also shown without). ``--sweep``: the kernel's launch shapes (block_m x block_n, warps,
stages), each checked against the default's output.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch

from chatcore.layers.alibi import bloom_slopes
from chatcore.layers.attention import attend_chunk, flash_available
from chatcore.layers.timing import event_seconds
from chatcore.layers.triton_prefill import launch_shape, num_splits, prefill_attention

SHAPES = {  # name -> (Hq, Hkv, D, window, alibi)
    "bloom-1b7": (16, 16, 128, None, True),
    "llama-3.1-8b": (32, 8, 128, None, False),
    "llama-3.1-8b-window": (32, 8, 128, 4096, False),
}

Chunk = tuple[torch.Tensor, int]   # (q [T, Hq, D], q_offset)
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def causal_flops(tokens: int, hq: int, d: int, window: int | None) -> float:
    rows = torch.arange(1, tokens + 1, dtype=torch.float64)   # keys row i sees without a window: i + 1
    if window is not None:
        rows = rows.clamp(max=window)
    return 4.0 * d * hq * rows.sum().item()


def time_prompt(fn: Kernel, chunks: list[Chunk], kc: torch.Tensor, vc: torch.Tensor, reps: int) -> float:
    """Seconds for every chunk of the prompt, one after another (median of ``reps`` after a warm-up)."""
    def run() -> None:
        for q, off in chunks:
            s = off + q.shape[0]
            fn(q, kc[:, :s], vc[:, :s], off)

    return event_seconds(run, reps)


def entry_point(backend: str, window: int | None, slopes: torch.Tensor | None) -> Kernel:
    return lambda q, k, v, off: attend_chunk(q, k, v, start=off, backend=backend, sliding_window=window, alibi=slopes)


def kernel(window: int | None, slopes: torch.Tensor | None, **shape: int) -> Kernel:
    return lambda q, k, v, off: prefill_attention(q, k, v, off, sliding_window=window, alibi=slopes, **shape)


def num_splits_for(hq: int, t: int, s: int, d: int, window: int | None) -> int:
    block_m, block_n = launch_shape(d)[:2]
    return num_splits(hq * -(-t // block_m), -(-min(s, window or s) // block_n), torch.device("cuda"))


def bench_shape(name: str, tokens: int, chunk: int, reps: int, sweep: bool, warm: int) -> None:
    hq, hkv, d, window, alibi = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(hkv, tokens + 256, d, generator=g, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn(hkv, tokens + 256, d, generator=g, device="cuda", dtype=torch.bfloat16)
    chunks = [(torch.randn(min(chunk, tokens - off), hq, d, generator=g, device="cuda", dtype=torch.bfloat16), off)
              for off in range(0, tokens, chunk)]
    slopes = bloom_slopes(hq).cuda() if alibi else None
    flops = causal_flops(tokens, hq, d, window)
    print(f"== {name}: Hq {hq}, Hkv {hkv}, D {d}, window {window}, ALiBi {alibi}; {tokens} tokens in chunks of "
          f"{chunk}; {flops / 1e12:.2f} TFLOP", flush=True)

    def report(label: str, fn: Kernel) -> float:
        try:
            t = time_prompt(fn, chunks, kc, vc, reps)
        except Exception as exc:  # noqa: BLE001 - one row failing (out of memory, a missing kernel) is a result
            print(f"  {label:<34} failed: {exc!s:.100}", flush=True)
            return float("inf")
        print(f"  {label:<34} {t * 1e3:9.2f} ms {flops / t / 1e12:7.1f} TFLOP/s", flush=True)
        return t

    report(f"triton-kernel {launch_shape(d)}", kernel(window, slopes))
    if flash_available():
        report("flash", entry_point("flash", window, slopes))
    else:
        print("  flash                              (flash-attn does not import)")
    report("torch-sdpa", entry_point("torch", window, slopes))
    if warm:   # one short chunk on top of the rest: few query tiles, so the kernel splits the key range
        q_warm = torch.randn(warm, hq, d, generator=g, device="cuda", dtype=torch.bfloat16)
        warm_chunks = [(q_warm, tokens - warm)]
        rows = torch.arange(tokens - warm + 1, tokens + 1, dtype=torch.float64)
        warm_flops = 4.0 * d * hq * (rows.clamp(max=window) if window is not None else rows).sum().item()
        print(f"  -- a warm turn: {warm} tokens on a {tokens - warm}-token cache; {warm_flops / 1e9:.1f} GFLOP")
        for label, fn in ((f"triton-kernel splits {num_splits_for(hq, warm, tokens, d, window)}",
                           kernel(window, slopes)),
                          ("triton-kernel splits 1", kernel(window, slopes, splits=1)),
                          ("flash", entry_point("flash", window, slopes) if flash_available() else None),
                          ("torch-sdpa", entry_point("torch", window, slopes))):
            if fn is not None:
                t = time_prompt(fn, warm_chunks, kc, vc, reps)
                print(f"  {label:<34} {t * 1e3:9.3f} ms {warm_flops / t / 1e12:7.1f} TFLOP/s", flush=True)
    if not sweep:
        return
    q_last, off_last = chunks[-1]
    s_last = off_last + q_last.shape[0]
    ref = prefill_attention(q_last, kc[:, :s_last], vc[:, :s_last], off_last,
                            sliding_window=window, alibi=slopes).float()
    results = []
    for bm, bn, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        shape = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
        fn = kernel(window, slopes, **shape)
        try:
            out = fn(q_last, kc[:, :s_last], vc[:, :s_last], off_last).float()
            err = (torch.linalg.norm(out - ref) / torch.linalg.norm(ref)).item()
        except Exception as exc:  # noqa: BLE001 - a launch shape the chip cannot take (shared memory)
            print(f"  sweep {bm}x{bn} warps {warps} stages {stages}: {exc!s:.80}", flush=True)
            continue
        t = report(f"sweep {bm:>3}x{bn:<3} warps {warps} stages {stages}", fn)
        if err > 1e-2:
            print(f"    WRONG: relative difference from the default shape's output {err:.3g}", flush=True)
        results.append((t, bm, bn, warps, stages))
    best = sorted(results)[:3]
    print("  best: " + "; ".join(f"{bm}x{bn} warps {w} stages {st}: {t * 1e3:.2f} ms ({flops / t / 1e12:.0f} TFLOP/s)"
                                 for t, bm, bn, w, st in best), flush=True)


def ptxas_report(shapes: list[tuple[int, int, int, int, int]]) -> None:
    """Compile the kernel for an H100 (sm_90) without one and print what ``ptxas -v`` says per launch shape
    (D, block_m, block_n, warps, stages), with ALiBi and a window on: shared memory, registers, spills and
    whether ptxas serialises the wgmma instructions (warning C7515). Runs on any machine with triton."""
    import inspect
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from chatcore.layers import triton_prefill

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    names = list(inspect.signature(triton_prefill._forward.fn).parameters)
    fp32 = ("slopes_ptr", "part_ptr", "ml_ptr", "qk_scale")
    signature = {n: "fp32" if n == "qk_scale" else ("*fp32" if n in fp32 else "*bf16") if n.endswith("_ptr")
                 else "constexpr" if n.isupper() else "i32" for n in names}
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or "stride" in n}
    for d, bm, bn, warps, stages in shapes:
        consts = dict(GROUP=4, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=bm, BLOCK_N=bn, SPLITS=1,
                      HAS_WINDOW=True, HAS_ALIBI=True, PREC="tf32", PIPELINE=True, UPCAST=False)
        try:
            compiled = triton.compile(ASTSource(triton_prefill._forward, signature, consts, aligned),
                                      target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=warps, num_stages=stages))
        except Exception as exc:  # noqa: BLE001 - a launch shape Triton refuses
            print(f"  D {d} {bm}x{bn} warps {warps} stages {stages}: {exc!s:.80}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(compiled.asm["ptx"])
            log = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True).stderr
        regs = next((line.split("Used ")[1].split(",")[0] for line in log.splitlines() if "Used" in line), "?")
        spills = next((line.split(",")[1].strip() for line in log.splitlines() if "spill stores" in line), "?")
        kib = compiled.metadata.shared // 1024
        print(f"  D {d:>3} {bm:>3}x{bn:<3} warps {warps} stages {stages}: shared {kib} KiB, {regs}, {spills}"
              f"{', wgmma SERIALISED' if 'C7515' in log else ''}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warm", type=int, default=256, help="also time one chunk of this many tokens on top of the "
                    "rest of the prompt (a warm chat turn; 0: no)")
    ap.add_argument("--sweep", action="store_true", help="time the kernel's launch shapes too")
    ap.add_argument("--ptxas", action="store_true", help="no GPU needed: compile the sweep's shapes for sm_90 and "
                    "print registers, spills and shared memory (ptxas -v)")
    args = ap.parse_args()
    if args.ptxas:
        ptxas_report([(d, *launch_shape(d)) for d in (64, 128, 256)]
                     + [(128, bm, bn, w, st) for bm, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8),
                                                                                   (2, 3, 4))])
        return
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}", flush=True)
    for name in args.shapes:
        bench_shape(name, args.tokens, args.chunk, args.reps, args.sweep, args.warm)


if __name__ == "__main__":
    main()
