"""Where a batched decode step's time goes (diagnostics for bench/batch.py; run on the GPU machine).

Usage: python bench/batch_profile.py [--model llama-3.1-8b] [--streams 1 32] [--ctx 512]

For each number of streams: slots filled with ``--ctx`` random prompt tokens through a
:class:`~chatcore.batch.paged_runner.PagedRunner`, then the decode graph of that bucket replayed (device events;
its bytes against the copy bandwidth), and one replay under torch.profiler: the kernels by total device time,
grouped by kind (projections, attention, norms, element-wise, ...), with each group's share of the step.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from batch import SHAPES, build_engine, build_hf, copy_bandwidth, replay_seconds  # noqa: E402

from chatcore.batch.paged import PagedPool  # noqa: E402
from chatcore.batch.paged_runner import PagedRunner  # noqa: E402
from chatcore.batch.runner import Work  # noqa: E402

# first match wins: flash-attn's "splitkv" kernels are attention, cuBLAS's "splitKreduce" a projection's
GROUPS = [("attention", r"attn|flash|paged|split_k|decode"), ("gemm", r"gemm|gemv|cutlass|sm90_xmma|nvjet|splitk"),
          ("norm", r"norm"), ("rope", r"rope|rotary|rotate"),
          ("silu", r"silu|act_and_mul"),
          ("argmax/logits", r"argmax|max|reduce"), ("copy", r"copy|memcpy|cat|index|gather|embedding")]


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, pat in GROUPS if re.search(pat, low)), "other")


def profile_replay(graph: torch.cuda.CUDAGraph) -> list[tuple[str, float, int]]:
    """(kernel, device seconds, calls) of one replay, most time first."""
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e6, e.count) for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="write batch_profile.json here")
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    hf = build_hf(args.model, dev, dtype)
    engine = build_engine(hf, dev, dtype, args.ctx + 256, args.backend, 4096)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in hf.named_parameters() if "embed_tokens" not in n)
    cfg = hf.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
    del hf
    torch.cuda.empty_cache()
    bw = copy_bandwidth(dev)
    model = engine.model
    pool = PagedPool.for_model(model, memory=8 << 30)
    runner = PagedRunner(model, pool)
    gen = torch.Generator().manual_seed(0)
    report: dict = {"model": args.model, "backend": model.backend, "ctx": args.ctx, "bandwidth": bw, "streams": {}}
    print(f"{args.model} backend {model.backend}, copy bandwidth {bw / 1e12:.2f} TB/s")
    for n in args.streams:
        slots = [runner.new_slot(args.ctx + 64) for _ in range(n)]
        for s in slots:
            runner.run([Work(s, torch.randint(0, cfg.vocab_size, (args.ctx,), generator=gen).tolist())])
        for s in slots:
            s.reserve(1)
        runner.greedy_step(slots, [1] * n)
        torch.cuda.synchronize()
        graph = runner.graphs.graphs[runner.graphs.bucket(n)][0]
        step = replay_seconds(graph)
        nbytes = weight_bytes + n * (args.ctx + 1) * kv_per_token
        kernels = profile_replay(graph)
        total = sum(k[1] for k in kernels)
        groups: dict[str, float] = defaultdict(float)
        for name, sec, _ in kernels:
            groups[group_of(name)] += sec
        print(f"\n{n} streams: replay {step * 1e3:.3f} ms, {nbytes / 1e9:.2f} GB -> {nbytes / step / bw:.0%} of the "
              f"copy bandwidth; kernels {total * 1e3:.3f} ms ({len(kernels)} kinds)")
        for g, sec in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {g:<14} {sec * 1e3:7.3f} ms  {sec / total:5.1%}")
        for name, sec, count in kernels[:16]:
            print(f"    {sec * 1e6:8.1f} us  x{count:<4} {name[:110]}")
        report["streams"][str(n)] = {"replay_s": step, "bytes": nbytes, "kernels": kernels[:40], "groups": groups}
        for s in slots:
            runner.release(s)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "batch_profile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
