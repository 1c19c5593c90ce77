"""GPU generation speed: chatcore (flash-attn and Triton backends, CUDA-graph decode) vs transformers
``generate`` (eager, and static cache + torch.compile), same random weights, same run, one GPU.

Usage (on the GPU machine): python bench/gpu.py --out DIR [--models llama-3.2-1b bloom-1b7 llama-3.1-8b]
    [--contexts 512 4096 8192 32768] [--compile-contexts ...] [--deadline SECONDS] [--kv-dtype int8|fp8]

Shapes are the real models' (bf16, random weights built by transformers from config classes; chatcore's
model reads the very same tensors). For each model and context:
- decode tokens/s: 128 greedy tokens after a prompt of that many tokens held in the cache; the roofline is
  the bytes one step must read (every weight the step multiplies by, plus K and V of the whole context) over
  the device-to-device copy bandwidth measured in this run (bytes read + written);
- prefill tokens/s (cold, whole prompt, through the first sampled token) at 8k and 32k;
- warm turn: time to the first token of a reply to 256 new tokens after a 32k-token history in the cache;
- a 128k-token prompt prefilled in chunks (first model only): peak memory beyond weights and KV cache.
transformers: decode = (generate(N+1) - generate(1)) / N; prefill = generate(1); its warm turn is one
forward of the 256 tokens over its DynamicCache. ``--kv-dtype``: each chatcore backend runs a second time with a
quantized KV cache (decode and prefill, no warm turn; results under ``<backend>+kv-<dtype>``, with their own
roofline, the KV cache's bytes and the speed-up over the same backend's bf16 cache, context by context; under
flash its decode step takes the triton kernel). Results go to DIR/gpu.json as they come (a run cut short keeps
what it measured) and a plot to DIR/gpu.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from chatcore.layers.timing import event_seconds

NEW_TOKENS = 128
WARM_NEW = 256

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(kind="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.1-8b": dict(kind="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "bloom-1b7": dict(kind="bloom", hidden_size=2048, n_layer=24, n_head=16, vocab_size=250880),
}


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, read + write counted (median of 10 after warm-up)."""
    src = torch.randn(512 * 1024 * 1024, device="cuda")
    dst = torch.empty_like(src)
    seconds = event_seconds(lambda: dst.copy_(src), reps=10, warmup=3)
    return 2 * 512 * 1024 * 1024 * 4 / seconds


def build_hf(name: str) -> torch.nn.Module:
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    spec = dict(SHAPES[name])
    kind = spec.pop("kind")
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (BloomConfig, BloomForCausalLM)
    cfg = cfg_cls(**spec, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = model_cls(cfg)
        finally:
            torch.set_default_dtype(default)
    return model.eval()


def build_engine(hf: torch.nn.Module, backend: str, window: int, kv_dtype: str | None = None):  # noqa: ANN201
    from chatcore.checkpoint_config import config_from_hf
    from chatcore.engine import Engine
    from chatcore.models import FAMILIES
    from chatcore.runtime import Runtime

    cfg = config_from_hf(hf.config.to_dict())
    if cfg.position != "rope":
        import dataclasses

        cfg = dataclasses.replace(cfg, max_position_embeddings=max(window, cfg.max_position_embeddings))
    state = hf.state_dict()
    runtime = Runtime(device=torch.device("cuda"), dtype=torch.bfloat16, max_seq_len=window, prefill_chunk=32768,
                      attention_backend=backend, kv_dtype=kv_dtype)
    model = FAMILIES[cfg.family](cfg, runtime, lambda n: state[n], backend)
    return Engine(model, cfg, runtime, tokenizer=None, source="random")


def roofline_bytes(hf: torch.nn.Module, ctx: int, kv_dtype: str | None = None) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step must read at context ``ctx`` (``kv_dtype``: a quantized cache,
    a byte per element and a float32 scale per token and head)."""
    c = hf.config
    total = sum(p.numel() * p.element_size() for p in hf.parameters())
    emb = hf.get_input_embeddings().weight
    if not getattr(c, "tie_word_embeddings", False):
        total -= emb.numel() * emb.element_size()   # the embedding table is not read, only one row of it
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    per_head = head_dim * 2 if kv_dtype is None else head_dim + 4
    return total, 2 * layers * kv_heads * per_head * ctx


def rand_ids(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def ours(engine, contexts: list[int], vocab: int, warm: bool) -> dict[str, Any]:  # noqa: ANN001
    import chatcore

    params = chatcore.SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    slot = engine.new_slot()
    out: dict[str, Any] = {"decode": {}, "prefill": {}}
    if slot.allocated:   # preallocated (CUDA graphs): the cache's bytes at the whole window
        out["kv_cache_bytes"] = {"window": slot.allocated, "bytes": slot.nbytes()}
    for ctx in contexts:
        ids = rand_ids(ctx, ctx, vocab)
        slot.reset()
        events = list(engine.generate(ids, params, slot=slot))   # warm-up (and graph capture on first use)
        rates = []
        for rep in range(2):
            slot.reset()
            t0 = sync_time()
            events = list(engine.generate(ids, params, slot=slot))
            total = sync_time() - t0
            st = events[-1].stats
            rates.append(st.decode_tokens_per_s)
            if rep == 0 and ctx >= 8192:
                out["prefill"][str(ctx)] = {"ttft_s": st.ttft_s, "tokens_per_s": ctx / st.ttft_s}
        out["decode"][str(ctx)] = {"tokens_per_s": max(rates), "runs": rates, "last_total_s": total}
        print(f"    ctx {ctx:>6}: decode {max(rates):8.1f} tok/s", flush=True)
    if warm:
        hist = rand_ids(32768, 7, vocab)
        slot.reset()
        list(engine.generate(hist, params.replace(max_new_tokens=1), slot=slot))
        one = params.replace(max_new_tokens=1)
        ttfts, prefills = [], []
        for rep in range(4):
            t0 = sync_time()
            ev = list(engine.generate(hist + rand_ids(WARM_NEW, 100 + rep, vocab), one, slot=slot))[-1]
            ttfts.append(sync_time() - t0)
            prefills.append(ev.stats.prefill_s)
            assert ev.stats.cached_tokens == 32768, ev.stats
        out["warm_turn_ttft_s"] = {"median": statistics.median(ttfts[1:]), "runs": ttfts, "prefill_s": prefills}
        print(f"    warm turn (+{WARM_NEW} on 32k): {statistics.median(ttfts[1:]) * 1e3:.1f} ms", flush=True)
    del slot
    return out


def hf_generate(hf: torch.nn.Module, ids: list[int], n: int, **kw: Any) -> float:
    x = torch.tensor([ids], device="cuda")
    t0 = sync_time()
    with torch.inference_mode():
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=0, **kw)
    return sync_time() - t0


def theirs(hf: torch.nn.Module, contexts: list[int], vocab: int, static: bool, warm: bool) -> dict[str, Any]:
    import torch._dynamo

    kw: dict[str, Any] = {"cache_implementation": "static"} if static else {}
    out: dict[str, Any] = {"decode": {}, "prefill": {}}
    for ctx in contexts:
        ids = rand_ids(ctx, ctx, vocab)
        try:
            if static:   # compile for this cache shape, outside the timing
                hf_generate(hf, ids, NEW_TOKENS + 1, **kw)
            t1 = min(hf_generate(hf, ids, 1, **kw) for _ in range(2))
            tn = min(hf_generate(hf, ids, NEW_TOKENS + 1, **kw) for _ in range(2))
        except Exception as exc:  # noqa: BLE001 - record why a peer configuration could not run
            out["decode"][str(ctx)] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"    ctx {ctx:>6}: failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        rate = NEW_TOKENS / (tn - t1)
        out["decode"][str(ctx)] = {"tokens_per_s": rate}
        if ctx >= 8192:
            out["prefill"][str(ctx)] = {"ttft_s": t1, "tokens_per_s": ctx / t1}
        print(f"    ctx {ctx:>6}: decode {rate:8.1f} tok/s (prefill {t1:.3f} s)", flush=True)
        if static:
            out["decode"][str(ctx)]["compiled_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    if warm and not static:
        try:
            out["warm_turn_ttft_s"] = _their_warm_turn(hf, vocab)
        except torch.OutOfMemoryError as exc:
            out["warm_turn_ttft_s"] = {"error": f"OutOfMemoryError: {str(exc)[:200]}"}
            print("    warm turn: out of memory", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    return out


def _their_warm_turn(hf: torch.nn.Module, vocab: int) -> dict[str, Any]:
    from transformers import DynamicCache

    hist = torch.tensor([rand_ids(32768, 7, vocab)], device="cuda")
    with torch.inference_mode():
        cache = DynamicCache()
        hf(hist, past_key_values=cache, logits_to_keep=1)
        ttfts = []
        for rep in range(4):
            new = torch.tensor([rand_ids(WARM_NEW, 100 + rep, vocab)], device="cuda")
            t0 = sync_time()
            logits = hf(new, past_key_values=cache, logits_to_keep=1).logits
            int(logits[0, -1].argmax())
            ttfts.append(sync_time() - t0)
            cache.crop(-WARM_NEW)
    print(f"    warm turn (+{WARM_NEW} on 32k): {statistics.median(ttfts[1:]) * 1e3:.1f} ms", flush=True)
    return {"median": statistics.median(ttfts[1:]), "runs": ttfts}


def long_prompt(hf: torch.nn.Module, backend: str, n: int) -> dict[str, Any]:
    """Prefill an ``n``-token prompt in chunks; memory above weights + KV cache stays near one chunk's."""
    engine = build_engine(hf, backend, n + 16)
    slot = engine.new_slot()
    kv = slot.nbytes()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = sync_time()
    engine.prefill(rand_ids(n, 9, engine.config.vocab_size), slot)
    elapsed = sync_time() - t0
    peak = torch.cuda.max_memory_allocated() - base
    res = {"tokens": n, "seconds": elapsed, "kv_cache_gib": kv / 2**30, "peak_above_weights_and_kv_gib": peak / 2**30,
           "chunk": engine.runtime.prefill_chunk}
    print(f"    {n} tokens: {elapsed:.2f} s, peak beyond weights+KV {peak / 2**30:.2f} GiB", flush=True)
    del slot, engine
    return res


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        m = results["models"][name]
        ctxs = sorted({int(c) for c in m.get("roofline_tokens_per_s", {})})
        series = {f"chatcore {b}": m.get("chatcore", {}).get(b, {}).get("decode", {}) for b in ("flash", "triton")}
        series.update({f"chatcore {b}": r.get("decode", {}) for b, r in m.get("chatcore", {}).items() if "+kv-" in b})
        series["transformers eager"] = m.get("transformers_eager", {}).get("decode", {})
        series["transformers static+compile"] = m.get("transformers_static_compile", {}).get("decode", {})
        width = 0.8 / (len(series) + 1)
        for i, (label, data) in enumerate(series.items()):
            ys = [data.get(str(c), {}).get("tokens_per_s", 0) for c in ctxs]
            ax.bar([j + i * width for j in range(len(ctxs))], ys, width, label=label)
        roof = [m["roofline_tokens_per_s"][str(c)] for c in ctxs]
        ax.bar([j + len(series) * width for j in range(len(ctxs))], roof, width, label="roofline", color="lightgray")
        ax.set_xticks([j + 0.4 for j in range(len(ctxs))], [f"{c // 1024}k" if c >= 1024 else str(c) for c in ctxs])
        ax.set_title(f"{name} decode (bf16, {results['device']})")
        ax.set_xlabel("context tokens")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--models", nargs="+", default=list(SHAPES))
    ap.add_argument("--contexts", nargs="+", type=int, default=[512, 4096, 8192, 32768])
    ap.add_argument("--compile-contexts", nargs="*", type=int, default=None,
                    help="contexts for transformers static cache + torch.compile (default: all)")
    ap.add_argument("--backends", nargs="*", default=["flash", "triton"])
    ap.add_argument("--long", type=int, default=131072, help="prompt length of the chunked-prefill check (0: skip)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-eager", action="store_true", help="skip transformers eager (keep its stored rows)")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds; later peer runs are skipped")
    ap.add_argument("--kv-dtype", choices=["int8", "fp8"], default=None,
                    help="also run each chatcore backend with this quantized KV cache (default: bf16 cache only)")
    args = ap.parse_args()
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "gpu.json"
    results: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}
    results.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
    import transformers

    results["transformers"] = transformers.__version__
    bw = copy_bandwidth()
    results.setdefault("copy_bandwidth_gbs", {})[args.models[0]] = bw / 1e9
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    results.setdefault("models", {})

    def save() -> None:
        json_path.write_text(json.dumps(results, indent=1))

    for mi, name in enumerate(args.models):
        print(f"== {name}", flush=True)
        hf = build_hf(name)
        vocab = hf.config.vocab_size
        m = results["models"].setdefault(name, {})
        w_bytes, _ = roofline_bytes(hf, 0)
        m["weight_bytes"] = w_bytes
        roof = m.setdefault("roofline_tokens_per_s", {})
        roof.update({str(c): bw / sum(roofline_bytes(hf, c)) for c in args.contexts})
        if args.kv_dtype:
            m.setdefault(f"roofline_tokens_per_s_kv_{args.kv_dtype}", {}).update(
                {str(c): bw / sum(roofline_bytes(hf, c, args.kv_dtype)) for c in args.contexts})
        m["copy_bandwidth_gbs"] = bw / 1e9
        window = max(args.contexts) + WARM_NEW + 256
        runs = [(b, None) for b in args.backends] + [(b, args.kv_dtype) for b in args.backends if args.kv_dtype]
        for backend, kv_dtype in runs:
            key = backend if kv_dtype is None else f"{backend}+kv-{kv_dtype}"
            print(f"  chatcore {key}", flush=True)
            engine = build_engine(hf, backend, window, kv_dtype)
            merge(m.setdefault("chatcore", {}).setdefault(key, {}),
                  ours(engine, args.contexts, vocab, warm=32768 in args.contexts and kv_dtype is None))
            del engine
            gc.collect()
            torch.cuda.empty_cache()
            save()
        if mi == 0 and args.long and args.backends:
            print("  chunked prefill, long prompt", flush=True)
            m["long_prompt"] = long_prompt(hf, args.backends[0], args.long)
            gc.collect()
            torch.cuda.empty_cache()
            save()
        if not args.no_hf:
            # like chatcore's, a peer's results merge per context: a run over some contexts keeps the others'
            if not args.no_eager:
                print("  transformers eager", flush=True)
                new = theirs(hf, args.contexts, vocab, static=False, warm=32768 in args.contexts)
                merge(m.setdefault("transformers_eager", {}), new)
                save()
            compile_ctx = args.compile_contexts if args.compile_contexts is not None else args.contexts
            done = m.setdefault("transformers_static_compile", {})
            for ctx in compile_ctx:
                if time.perf_counter() - start > args.deadline:
                    print(f"  transformers static+compile {ctx}: not run (deadline)", flush=True)
                    continue
                print("  transformers static+compile", flush=True)
                merge(done, theirs(hf, [ctx], vocab, static=True, warm=False))
                save()
        for key, res in m.get("chatcore", {}).items():
            backend, _, kv = key.partition("+kv-")
            roofline = m[f"roofline_tokens_per_s_kv_{kv}"] if kv else m["roofline_tokens_per_s"]
            for ctx, d in res["decode"].items():
                d["fraction_of_roofline"] = d["tokens_per_s"] / roofline[ctx]
                bf16 = m["chatcore"].get(backend, {}).get("decode", {}).get(ctx, {})
                if kv and "tokens_per_s" in bf16:
                    d["speedup_vs_bf16_kv"] = d["tokens_per_s"] / bf16["tokens_per_s"]
                for peer in ("transformers_eager", "transformers_static_compile"):
                    p = m.get(peer, {}).get("decode", {}).get(ctx, {})
                    if "tokens_per_s" in p:
                        d[f"speedup_vs_{peer}"] = d["tokens_per_s"] / p["tokens_per_s"]
        save()
        del hf
        gc.collect()
        torch.cuda.empty_cache()
    results["elapsed_s"] = time.perf_counter() - start
    save()
    plot(results, args.out / "gpu.png")
    print_table(results)


def merge(res: dict[str, Any], new: dict[str, Any]) -> None:
    """Fold one run's results into the stored ones: per context, so a run over some contexts keeps the others'."""
    for key in ("decode", "prefill"):
        res.setdefault(key, {}).update(new.get(key, {}))
    if "kv_cache_bytes" in new:
        res["kv_cache_bytes"] = new["kv_cache_bytes"]
    if "warm_turn_ttft_s" in new:
        res["warm_turn_ttft_s"] = new["warm_turn_ttft_s"]


def print_table(results: dict[str, Any]) -> None:
    print("\nmodel          ctx    backend  tok/s   roof%  vs-eager vs-compile  (quantized KV: vs-bf16-KV)")
    for name, m in results["models"].items():
        for backend, res in m.get("chatcore", {}).items():
            for ctx, d in res["decode"].items():
                roof = 100 * d.get("fraction_of_roofline", 0)
                print(f"{name:<14} {ctx:>6} {backend:<7} {d['tokens_per_s']:7.1f} {roof:5.1f}"
                      f"  {d.get('speedup_vs_transformers_eager', 0):6.2f}x  "
                      f"{d.get('speedup_vs_transformers_static_compile', 0):6.2f}x"
                      + (f"  {d['speedup_vs_bf16_kv']:5.2f}x" if "speedup_vs_bf16_kv" in d else ""))
            for ctx, p in res.get("prefill", {}).items():
                print(f"{name:<14} {ctx:>6} {backend:<7} prefill {p['tokens_per_s']:9.0f} tok/s ({p['ttft_s']:.3f} s)")
            if "warm_turn_ttft_s" in res:
                print(f"{name:<14}  warm   {backend:<7} ttft {res['warm_turn_ttft_s']['median'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
