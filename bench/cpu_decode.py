"""CPU prefill and decode speed: chatcore vs transformers ``generate`` on the same demo weights, same run.

Usage: python bench/cpu_decode.py [--out bench/cpu_decode.json] [--new-tokens 64] [--repeats 3]

The demo model (SmolLM2-135M-Instruct) is loaded by chatcore from its GGUF, and by transformers from the
safetensors directory chatcore converts it to (identical float32 weights). Prompts are real chat text
of 128 and 2,048 tokens. Decode speed excludes the prefill: it is (N - 1) tokens over the time from the
first sampled token to the last, for both engines (for transformers: generate(N+1) - generate(1)).
The hardware limit is the bytes one decode step must read (float32 weights, plus the KV cache at that
context length) over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import chatcore
from chatcore.convert import gguf_to_hf_dir
from chatcore.demo import ensure_demo_model, home

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type spread from "
        "workshop to workshop across Europe. Printers learned to cast letters, mix inks and build presses; "
        "within fifty years millions of books were in circulation. ")


def copy_bandwidth() -> float:
    """Bytes per second of a large tensor copy (read + write counted)."""
    src = torch.randn(64 * 1024 * 1024 // 4 * 4)  # 256 MiB of float32
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / min(times)


def prompt_ids(engine: chatcore.Engine, n: int) -> list[int]:
    tok = engine.tokenizer
    body = tok.encode(TEXT * (n // 40 + 2))
    head = tok.apply_chat_template([{"role": "user", "content": "Summarize: "}], add_generation_prompt=False)
    return (head + body)[:n]


def median_time(fn, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_ours(engine: chatcore.Engine, ids: list[int], new: int, repeats: int) -> dict[str, float]:
    prefill = median_time(lambda: engine.prefill(ids, engine.new_slot()), repeats)
    params = chatcore.SamplingParams(max_new_tokens=new, ignore_eos=True)
    rates = [list(engine.generate(ids, params))[-1].stats.decode_tokens_per_s for _ in range(repeats)]
    return {"prefill_tok_s": len(ids) / prefill, "decode_tok_s": statistics.median(rates)}


def bench_hf(model, ids: list[int], new: int, repeats: int) -> dict[str, float]:  # noqa: ANN001
    x = torch.tensor([ids])

    def gen(n: int) -> None:
        model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        prefill = median_time(lambda: model(x, use_cache=True), repeats)
        one = median_time(lambda: gen(1), repeats)
        full = median_time(lambda: gen(new), repeats)
    return {"prefill_tok_s": len(ids) / prefill, "decode_tok_s": (new - 1) / (full - one)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("cpu_decode.json")))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from transformers import LlamaForCausalLM

    gguf = ensure_demo_model()
    hf_dir = home() / "bench" / "demo-hf"
    if not (hf_dir / "model.safetensors").exists():
        gguf_to_hf_dir(gguf, hf_dir)
    engine = chatcore.load(gguf, device="cpu", dtype="float32")
    ref = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    c = engine.config
    kv_bytes_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
    bandwidth = copy_bandwidth()

    rows = []
    for n in (128, 2048):
        ids = prompt_ids(engine, n)
        # Interleaved, one repeat of each at a time, so drift in a shared machine's speed hits both alike.
        runs = [(bench_ours(engine, ids, args.new_tokens, 1), bench_hf(ref, ids, args.new_tokens, 1))
                for _ in range(args.repeats)]
        ours = {k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}
        theirs = {k: statistics.median(r[1][k] for r in runs) for k in runs[0][1]}
        limit = bandwidth / (weight_bytes + kv_bytes_per_token * n)  # tok/s if each step read its bytes once
        rows.append({
            "prompt_tokens": n, "chatcore": ours, "transformers": theirs,
            "decode_speedup": ours["decode_tok_s"] / theirs["decode_tok_s"],
            "prefill_speedup": ours["prefill_tok_s"] / theirs["prefill_tok_s"],
            "bandwidth_limit_tok_s": limit,
            "decode_fraction_of_bandwidth_limit": ours["decode_tok_s"] / limit,
        })
    result = {
        "model": "SmolLM2-135M-Instruct (demo GGUF, float32 on the CPU)",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "copy_bandwidth_GBps": bandwidth / 1e9},
        "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes_per_token, "new_tokens": args.new_tokens,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))
    head = ("prompt", "ours dec", "hf dec", "x", "ours pre", "hf pre", "x", "of limit")
    print("{:>7} {:>9} {:>8} {:>5} {:>9} {:>8} {:>5} {:>8}".format(*head))
    for r in rows:
        o, h = r["chatcore"], r["transformers"]
        print(f"{r['prompt_tokens']:>7} {o['decode_tok_s']:>9.1f} {h['decode_tok_s']:>8.1f} "
              f"{r['decode_speedup']:>5.2f} {o['prefill_tok_s']:>9.0f} {h['prefill_tok_s']:>8.0f} "
              f"{r['prefill_speedup']:>5.2f} "
              f"{r['decode_fraction_of_bandwidth_limit']:>8.0%}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [str(r["prompt_tokens"]) for r in result["rows"]]
    panels = ((axes[0], "decode_tok_s", "decode tokens/s"), (axes[1], "prefill_tok_s", "prefill tokens/s"))
    for ax, key, title in panels:
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [r["chatcore"][key] for r in result["rows"]], 0.4, label="chatcore")
        ax.bar([x + 0.2 for x in xs], [r["transformers"][key] for r in result["rows"]], 0.4, label="transformers")
        ax.set_xticks(list(xs), labels)
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
    limits = [r["bandwidth_limit_tok_s"] for r in result["rows"]]
    axes[0].plot(range(len(labels)), limits, "k_", ms=30, label="bandwidth limit")
    axes[0].legend(fontsize=8)
    fig.suptitle(result["model"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
