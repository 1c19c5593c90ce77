"""Quantized weights and KV cache on the GPU: memory and decode / prefill speed of each weight format against the
bf16 engine, same shapes, same run.

Usage (on the GPU machine): python bench/quant_gpu.py --out DIR [--models llama-3.1-8b llama-3.2-1b llama-3-70b]
    [--formats bf16 q4_k_m q4_0 q8_0 int4 int8 fp8] [--contexts 512 4096 32768] [--kv-context 32768]
    [--deadline SECONDS]

Weights are random at the real models' shapes, made on the GPU: GGUF formats as random blocks of that type
(scales set so values have about the spread of real weights) repacked by chatcore's own GGUF path
(:func:`chatcore.quant.gguf_pack.pack_gguf`); ``q4_k_m`` mixes Q4_K and Q6_K the way llama.cpp's Q4_K_M does
(Q6_K for the output head and for attn_v / ffn_down of the layers llama.cpp gives more bits); ``int8``,
``int4`` (group 64) and ``fp8`` quantize random bf16 weights with :func:`chatcore.quant.quantize.quantize`.
For each format: the GPU memory its weights take (allocated, and the planes' own bytes), decode tokens/s at each
context (128 greedy tokens after a prompt of that length, CUDA graphs), the roofline (bytes a decode step reads —
every weight it multiplies by plus K and V of the context — over the device copy bandwidth measured in the run),
cold prefill tokens/s of a 4k prompt, and the ratios to bf16. Then, for the first model, decode at
``--kv-context`` with the KV cache in bf16, fp8 and int8, for bf16 and q4_k_m weights, and the KV bytes.
Results go to DIR/quant_gpu.json as they come and a plot to DIR/quant_gpu.png; a short table is printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chatcore.layers.timing import event_seconds

NEW_TOKENS = 128
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
GGUF_FORMATS = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0", "q4_k": "Q4_K",
                "q5_k": "Q5_K", "q6_k": "Q6_K"}
QUANTIZE = {"int8": ("int8", 64), "int4": ("int4", 64), "int4-g128": ("int4", 128), "fp8": ("fp8", 0)}


def config(name: str) -> Any:
    from chatcore.checkpoint_config import config_from_hf

    raw = dict(SHAPES[name], vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
               rope_scaling=LLAMA3_ROPE, model_type="llama", architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5,
               bos_token_id=1, eos_token_id=2)
    return config_from_hf(raw)


def copy_bandwidth() -> float:
    src = torch.empty(512 * 1024 * 1024, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / event_seconds(lambda: dst.copy_(src), reps=10, warmup=3)


# -- random GGUF blocks -------------------------------------------------------------------------------------------
# where each type keeps its float16 scale fields in a block, and values that give weights a spread of ~0.02
_F16_FIELDS: dict[str, list[tuple[int, float]]] = {
    "Q4_0": [(0, 0.004)], "Q4_1": [(0, 0.004), (2, -0.03)], "Q5_0": [(0, 0.002)], "Q5_1": [(0, 0.002), (2, -0.03)],
    "Q8_0": [(0, 0.0003)], "Q4_K": [(0, 1.3e-4), (2, 1e-3)], "Q5_K": [(0, 7e-5), (2, 1e-3)], "Q6_K": [(208, 1.5e-5)],
}


def random_gguf(qtype_name: str, n: int, k: int, gen: torch.Generator) -> Any:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from chatcore.quant.gguf_pack import pack_gguf

    qtype = GGMLQuantizationType[qtype_name]
    block, size = GGML_QUANT_SIZES[qtype]
    raw = torch.randint(0, 256, (n, k // block, size), dtype=torch.uint8, device="cuda", generator=gen)
    for offset, value in _F16_FIELDS[qtype_name]:
        scale = torch.full((n, k // block), value, dtype=torch.float16, device="cuda")
        raw[:, :, offset:offset + 2] = scale.view(torch.uint8).view(n, k // block, 2)
    return pack_gguf(raw.view(n, -1), qtype, (n, k))


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's Q4_K_M rule for which layers' attn_v / ffn_down get Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def weight_source(cfg: Any, fmt: str, seed: int) -> Callable[[str], Any]:
    """``get(name)`` for the model's tensors in format ``fmt`` (bf16 tensors, or PackedWeights for 2-D ones)."""
    from chatcore.parallel.random_weights import RandomWeights

    dense = RandomWeights(cfg, seed, "cuda", torch.bfloat16)
    gen = torch.Generator("cuda").manual_seed(seed)

    def gguf_type(name: str) -> str:
        if fmt != "q4_k_m":
            return GGUF_FORMATS[fmt]
        if name == "lm_head.weight":
            return "Q6_K"
        if name.endswith(("v_proj.weight", "down_proj.weight")):
            return "Q6_K" if more_bits(int(name.split(".")[2]), cfg.num_layers) else "Q4_K"
        return "Q4_K"

    def get(name: str) -> Any:
        shape = dense.shape(name)
        if fmt == "bf16" or len(shape) != 2:
            return dense.get(name)
        if fmt in QUANTIZE:
            if name == "model.embed_tokens.weight":
                return dense.get(name)   # --quantize keeps the embedding float (a lookup reads one row)
            from chatcore.quant.quantize import quantize

            mode, group = QUANTIZE[fmt]
            return quantize(dense.get(name), mode, group=group or 64)
        return random_gguf(gguf_type(name), shape[0], shape[1], gen)

    return get


def build(cfg: Any, fmt: str, window: int, kv_dtype: str | None, backend: str) -> tuple[Any, dict[str, int]]:
    from chatcore.checkpoint import build_model
    from chatcore.engine import Engine
    from chatcore.quant.packed import PackedWeight
    from chatcore.runtime import Runtime

    runtime = Runtime(device=torch.device("cuda"), dtype=torch.bfloat16, max_seq_len=window, prefill_chunk=32768,
                      attention_backend=backend, kv_dtype=kv_dtype)
    get = weight_source(cfg, fmt, seed=0)
    sizes = {"weights": 0, "embedding": 0}

    def counted(name: str) -> Any:
        t = get(name)
        n = t.nbytes() if isinstance(t, PackedWeight) else t.numel() * t.element_size()
        sizes["weights"] += n
        if name == "model.embed_tokens.weight":
            sizes["embedding"] = n
        return t

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = build_model(cfg, runtime, counted)
    torch.cuda.synchronize()
    sizes["allocated"] = torch.cuda.memory_allocated() - before
    return Engine(model, cfg, runtime, tokenizer=None, source=f"random {fmt}"), sizes


def read_bytes(cfg: Any, sizes: dict[str, int], ctx: int, kv_dtype: str | None) -> int:
    """Bytes one decode step reads: the weights it multiplies by (a lookup reads one embedding row; a tied head
    reads the table) plus K and V of ``ctx`` tokens."""
    weights = sizes["weights"] - (0 if cfg.tie_word_embeddings else sizes["embedding"])
    per = 2 if kv_dtype is None else (cfg.head_dim + 4) / cfg.head_dim
    return int(weights + 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * ctx * per)


def decode_rate(engine: Any, ctx: int, vocab: int) -> tuple[float, float, float]:
    """(best decode tokens/s of two runs, cold time to first token, KV bytes per token of the slot) after a
    ``ctx``-token prompt."""
    import chatcore

    params = chatcore.SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    ids = torch.randint(3, vocab, (ctx,), generator=torch.Generator().manual_seed(ctx)).tolist()
    slot = engine.new_slot()
    list(engine.generate(ids, params, slot=slot))   # warm-up: graph capture, kernel choices
    rates, ttft = [], 0.0
    for _ in range(2):
        slot.reset()
        events = list(engine.generate(ids, params, slot=slot))
        rates.append(events[-1].stats.decode_tokens_per_s)
        ttft = events[-1].stats.ttft_s
    kv = slot.nbytes() / slot.allocated
    del slot
    return max(rates), ttft, kv


def measure(name: str, fmt: str, contexts: list[int], bw: float, backend: str,
            kv_dtype: str | None = None) -> dict[str, Any]:
    cfg = config(name)
    t0 = time.perf_counter()
    engine, sizes = build(cfg, fmt, max(contexts) + NEW_TOKENS + 8, kv_dtype, backend)
    out: dict[str, Any] = {"build_s": time.perf_counter() - t0, "weight_bytes": sizes["weights"],
                           "allocated_bytes": sizes["allocated"], "decode": {}, "kv_dtype": kv_dtype}
    for ctx in contexts:
        rate, ttft, kv = decode_rate(engine, ctx, cfg.vocab_size)
        out["kv_bytes_per_token"] = kv
        need = read_bytes(cfg, sizes, ctx, kv_dtype)
        out["decode"][str(ctx)] = {"tokens_per_s": rate, "bytes_per_token": need, "roofline_tokens_per_s": bw / need,
                                   "of_roofline": rate * need / bw, "prefill_tokens_per_s": ctx / ttft}
        print(f"  {name} {fmt:>9} kv={kv_dtype or 'bf16':>4} ctx {ctx:>6}: {rate:7.1f} tok/s "
              f"({100 * rate * need / bw:4.1f}% of {bw / need:6.1f}), prefill {ctx / ttft:9.0f} tok/s, "
              f"weights {sizes['weights'] / 2**30:5.2f} GiB", flush=True)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = [m for m in results["models"] if results["models"][m]]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models, strict=False):
        fmts = list(results["models"][m])
        ctx = max(results["models"][m][fmts[0]]["decode"], key=int)
        rates = [results["models"][m][f]["decode"].get(ctx, {}).get("tokens_per_s", 0) for f in fmts]
        roof = [results["models"][m][f]["decode"].get(ctx, {}).get("roofline_tokens_per_s", 0) for f in fmts]
        x = range(len(fmts))
        ax.bar(x, roof, color="#dddddd", label="roofline")
        ax.bar(x, rates, color="#3366aa", label="chatcore")
        ax.set_xticks(list(x), fmts, rotation=30)
        ax.set_title(f"{m}, decode at {ctx} tokens")
        ax.set_ylabel("tokens/s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def print_table(results: dict[str, Any]) -> None:
    print("\nmodel        format     GiB    ctx  tok/s  %roof  x bf16  prefill x bf16")
    for m, fmts in results["models"].items():
        base = fmts.get("bf16", {}).get("decode", {})
        for f, r in fmts.items():
            for ctx, d in r["decode"].items():
                ref = base.get(ctx, {})
                vs = d["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
                pf = d["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"] if ref else float("nan")
                print(f"{m:12} {f:9} {r['weight_bytes'] / 2**30:5.2f} {ctx:>6} {d['tokens_per_s']:6.1f} "
                      f"{100 * d['of_roofline']:5.1f}  {vs:5.2f}  {pf:5.2f}")
    for key, r in results.get("kv", {}).items():
        d = next(iter(r["decode"].values()))
        print(f"kv {key:24} {d['tokens_per_s']:7.1f} tok/s  kv bytes/token {r.get('kv_bytes_per_token')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=["llama-3.1-8b", "llama-3.2-1b"])
    ap.add_argument("--formats", nargs="+", default=["bf16", "q4_k_m", "q4_0", "q8_0", "int4", "int8", "fp8"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[512, 4096])
    ap.add_argument("--kv-context", type=int, default=32768, help="0: skip the KV cache dtype runs")
    ap.add_argument("--kv-formats", nargs="+", default=["bf16", "q4_k_m"])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--deadline", type=float, default=540.0, help="stop starting new runs after this many seconds")
    args = ap.parse_args()
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth()
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "copy_bandwidth": bw, "new_tokens": NEW_TOKENS,
                               "backend": args.backend, "models": {}, "kv": {}, "errors": {}}
    print(f"{results['gpu']}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)

    def save() -> None:
        (args.out / "quant_gpu.json").write_text(json.dumps(results, indent=1))

    def attempt(key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        if time.perf_counter() - start > args.deadline:
            results["errors"][key] = "skipped: deadline"
            return None
        try:
            return fn()
        except Exception as exc:   # a format that fails is reported, the others still run
            results["errors"][key] = f"{type(exc).__name__}: {exc}"
            print(f"  {key}: {type(exc).__name__}: {exc}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            return None
        finally:
            save()

    for m in args.models:
        results["models"][m] = {}
        fmts = args.formats if m != "llama-3-70b" else [f for f in args.formats if f in ("q4_k_m", "q4_0", "int4")]
        for f in fmts:
            r = attempt(f"{m}/{f}", lambda m=m, f=f: measure(m, f, args.contexts, bw, args.backend))
            if r is not None:
                results["models"][m][f] = r
    if args.kv_context:
        m = args.models[0]
        for f in args.kv_formats:
            for kv in (None, "fp8", "int8"):
                r = attempt(f"kv/{m}/{f}/{kv}", lambda f=f, kv=kv: measure(m, f, [args.kv_context], bw, args.backend,
                                                                           kv_dtype=kv))
                if r is not None:
                    results["kv"][f"{m} {f} kv={kv or 'bf16'}"] = r
    save()
    plot(results, args.out / "quant_gpu.png")
    print_table(results)


if __name__ == "__main__":
    main()
