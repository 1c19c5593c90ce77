"""Where a GPU decode step's time goes (diagnostics for bench/gpu.py; run on the GPU machine).

Usage: python bench/gpu_profile.py [--model llama-3.2-1b] [--ctx 4096]

Prints, per attention backend: the captured graph's replay time per step (device events), the same step
run eagerly, a full ``generate`` per-token time, the top kernels of one eager step (torch.profiler), and
the bandwidth cuBLAS reaches on each weight shape of the model as a 1-row product (and the Triton GEMV, and the
gate/up projection with its SiLU epilogue fused against projection + ``silu_mul``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu import build_engine, build_hf, rand_ids, roofline_bytes  # noqa: E402

import chatcore  # noqa: E402
from chatcore.cuda_graph import DecodeGraph  # noqa: E402
from chatcore.layers.attention import sized_by_buffer  # noqa: E402
from chatcore.layers.timing import event_seconds, graph_seconds  # noqa: E402


def sweep_attention() -> None:
    """Decode attention of an 8B-shaped layer (32 q / 8 kv heads, dim 128) over a 33k-slot cache."""
    from chatcore.layers.triton_decode import decode_attention, num_splits

    cap = 33280
    q = torch.randn(32, 128, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(8, cap, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for ctx in (4096, 32768):
        pos = torch.tensor([ctx - 1], dtype=torch.int32, device="cuda")
        kv = 2 * 8 * ctx * 128 * 2
        base = num_splits(8, cap)
        for splits in (base // 2, base, base * 2):
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (3, 4):
                        try:
                            t = graph_seconds(lambda s=splits, b=block_n, w=warps, st=stages, p=pos: decode_attention(
                                q, kc, vc, p, splits=s, block_n=b, num_warps=w, num_stages=st))
                        except Exception as exc:  # noqa: BLE001 - a launch shape the chip cannot take
                            print(f"  sweep ctx {ctx} splits {splits} block {block_n} warps {warps}: {exc!s:.60}")
                            continue
                        print(f"  sweep ctx {ctx:>5} splits {splits:>3} block {block_n:>3} warps {warps} "
                              f"stages {stages}: {t * 1e6:6.1f} us {kv / t / 1e9:5.0f} GB/s")


def gate_up(hf: torch.nn.Module) -> None:
    """Layer 0's fused gate/up projection with its activation: the projection (as ``linear`` picks) then
    ``silu_mul``, against the one-launch GEMV with the SiLU epilogue at each rows-per-program it may take."""
    from chatcore.layers.activation import _BLOCKS, _FUSED_CHOICE, fastest_fused, silu_mul
    from chatcore.layers.linear import linear
    from chatcore.layers.triton_gemv import gemv_gate_up_silu

    mlp = getattr(hf.model.layers[0], "mlp", None) if hasattr(hf, "model") else None
    if mlp is None or not hasattr(mlp, "gate_proj"):
        return   # no gated MLP (BLOOM)
    w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()
    x = torch.randn(1, w.shape[1], device="cuda", dtype=w.dtype)
    gb = w.numel() * w.element_size() / 1e9
    linear(x, w)
    unfused = graph_seconds(lambda: silu_mul(linear(x, w)))
    fused = {block: graph_seconds(lambda block=block: gemv_gate_up_silu(x, w, None, block)) for block in _BLOCKS}
    print(f"  gate_up+silu {tuple(w.shape)}: projection+silu_mul {unfused * 1e6:6.1f} us {gb / unfused:5.0f} GB/s | "
          + " | ".join(f"fused rows {b} {t * 1e6:6.1f} us {gb / t:5.0f} GB/s" for b, t in fused.items())
          + f" | picks rows {fastest_fused(x, w, None)} (0: unfused)")
    _FUSED_CHOICE.clear()


def sweep_flash_splits() -> None:
    """flash-attn's decode kernel (append + ALiBi or in-kernel rotary, as the flash backend calls it) for the
    BLOOM-1b7 and Llama-3.1-8B layer shapes over cache spans: its own split heuristic (0) against fixed splits."""
    from flash_attn import flash_attn_with_kvcache

    from chatcore.layers.alibi import bloom_slopes

    for name, hq, hkv, alibi in (("bloom-1b7", 16, 16, True), ("llama-3.1-8b", 32, 8, False)):
        slopes = bloom_slopes(hq).cuda() if alibi else None
        for span, live in ((1024, 600), (4096, 4000), (8192, 4500), (33280, 32800)):
            kc, vc = (torch.randn(1, span, hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            q = torch.randn(1, 1, hq, 128, device="cuda", dtype=torch.bfloat16)
            kn, vn = (torch.randn(1, 1, hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            seqlens = torch.tensor([live], dtype=torch.int32, device="cuda")
            cos = sin = None
            if not alibi:
                ang = torch.rand(span, 64, device="cuda")
                cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
            kw = dict(k=kn, v=vn, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens, causal=True,
                      alibi_slopes=slopes)
            row = []
            for splits in (0, 1, 2, 4, 8, 16, 32):
                t = graph_seconds(lambda s=splits, a=(q, kc, vc), kw=kw: flash_attn_with_kvcache(*a, **kw,
                                                                                           num_splits=s))
                row.append(f"{splits}:{t * 1e6:5.1f}")
            print(f"  flash splits {name} span {span:>5} live {live:>5} (us): " + "  ".join(row), flush=True)


def sweep_prefill(hf: torch.nn.Module, n: int, backends: list[str]) -> None:
    """Cold prefill of ``n`` tokens at several chunk sizes: time and memory beyond weights and KV cache."""
    import dataclasses
    import time

    ids = rand_ids(n, 3, hf.config.vocab_size)
    for backend in backends:
        engine = build_engine(hf, backend, n + 64)
        slot = engine.new_slot()
        for chunk in (4096, 16384, 32768):
            engine.runtime = dataclasses.replace(engine.runtime, prefill_chunk=chunk)
            times = []
            for _ in range(2):
                slot.reset()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                int(engine.prefill(ids, slot)[-1].argmax())
                times.append(time.perf_counter() - t0)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            print(f"  prefill {backend:<6} {n} tokens, chunk {chunk:>5}: {min(times):.3f} s "
                  f"({n / min(times):.0f} tok/s), peak beyond weights+KV {peak:.2f} GiB", flush=True)
        slot.reset()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            int(engine.prefill(ids, slot)[-1].argmax())
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70))
        del engine, slot


def warm_turn(hf: torch.nn.Module, backends: list[str], history: int = 32768, new: int = 256) -> None:
    """Where a warm turn's time to first token goes: ``new`` tokens after ``history`` held in the slot."""
    import time

    vocab = hf.config.vocab_size
    hist, extra = rand_ids(history, 7, vocab), rand_ids(new, 8, vocab)
    one = chatcore.SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True)
    for backend in backends:
        engine = build_engine(hf, backend, history + new + 256)
        slot = engine.new_slot()
        list(engine.generate(hist, one, slot=slot))
        parts: dict[str, list[float]] = {"generate": [], "prefill only": [], "ids check + prefix match": []}
        for rep in range(4):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            list(engine.generate(hist + extra, one, slot=slot))
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            slot.truncate(history)
            engine.prefill(extra, slot)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            slot.truncate(history)
            engine._check_ids(hist + extra)
            slot.common_prefix(hist + extra)
            t3 = time.perf_counter()
            if rep:
                for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                    parts[key].append(dt)
        print(f"== warm turn {backend} (+{new} on {history}): " + ", ".join(
            f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in parts.items()), flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            list(engine.generate(hist + extra, one, slot=slot))
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60))
        del engine, slot


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--backends", nargs="+", default=["flash", "triton"])
    ap.add_argument("--sweep", action="store_true", help="time the Triton decode kernel's launch shapes")
    ap.add_argument("--prefill", type=int, default=0, help="time a cold prefill of this many tokens per chunk size")
    ap.add_argument("--flash-splits", action="store_true", help="time flash-attn's decode kernel per split count")
    ap.add_argument("--warm", action="store_true", help="break down a warm turn (+256 tokens on 32k) and stop")
    args = ap.parse_args()
    if args.flash_splits:
        sweep_flash_splits()
        return
    hf = build_hf(args.model)
    w, kv = roofline_bytes(hf, args.ctx)
    print(f"{args.model}: weights {w / 1e9:.2f} GB, KV at {args.ctx}: {kv / 1e9:.3f} GB")
    from chatcore.layers.gemv_choice import _CHOICE, triton_gemv_wins
    from chatcore.layers.triton_gemv import gemv

    for name, p in hf.named_parameters():
        if (p.dim() == 2 and ".0." in name) or name == "lm_head.weight":
            xi = torch.randn(1, p.shape[1], device="cuda", dtype=torch.bfloat16)

            def reps(fn, xi=xi, p=p) -> float:  # noqa: ANN001
                return graph_seconds(lambda: fn(xi, p))

            tc, tt = reps(torch.nn.functional.linear), reps(gemv)
            gb = p.numel() * 2 / 1e9
            print(f"  {name:<42} {tuple(p.shape)}: cuBLAS {tc * 1e6:6.1f} us {gb / tc:5.0f} GB/s | "
                  f"triton {tt * 1e6:6.1f} us {gb / tt:5.0f} GB/s | picks triton: {triton_gemv_wins(xi, p, None)}")
    gate_up(hf)
    _CHOICE.clear()
    if args.warm:
        warm_turn(hf, args.backends)
        return
    if args.sweep:
        sweep_attention()
    if args.prefill:
        sweep_prefill(hf, args.prefill, args.backends)
        return
    for backend in args.backends:
        engine = build_engine(hf, backend, args.ctx + 512)
        slot = engine.new_slot()
        engine.prefill(rand_ids(args.ctx, 1, hf.config.vocab_size), slot)
        graph = DecodeGraph(engine.model, slot, spans=sized_by_buffer(backend))
        replay = event_seconds(graph.current()[0].replay, 100)
        token = torch.zeros(1, dtype=torch.long, device="cuda")
        pos = torch.full((1,), slot.length, dtype=torch.int32, device="cuda")
        with torch.inference_mode():
            eager = event_seconds(lambda e=engine, t=token, p=pos, s=slot: e.model.decode(t, p, s), 20)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    engine.model.decode(token, pos, slot)
                torch.cuda.synchronize()
        slot.reset()
        params = chatcore.SamplingParams(temperature=0.0, max_new_tokens=128, ignore_eos=True)
        ids = rand_ids(args.ctx, 2, hf.config.vocab_size)
        list(engine.generate(ids, params, slot=slot))
        slot.reset()
        st = list(engine.generate(ids, params, slot=slot))[-1].stats
        print(f"== {backend}: graph replay {replay * 1e3:.3f} ms/step ({(w + kv) / replay / 1e9:.0f} GB/s), "
              f"eager step {eager * 1e3:.3f} ms, generate {1e3 / st.decode_tokens_per_s:.3f} ms/token")
        gpu_ops = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
        print(f"   device ops per step (kernels, copies): {sum(e.count for e in gpu_ops) / 3:.0f}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        del engine, slot, graph


if __name__ == "__main__":
    main()
