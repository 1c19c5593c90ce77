"""CPU prefill and decode speed: chatcore vs transformers ``generate`` on the same demo weights, same run.

Usage: python bench/cpu_decode.py [--out bench/cpu_decode.json] [--new-tokens 64] [--repeats 3]
       [--llama-python /path/to/python] [--no-int8]

The demo model (SmolLM2-135M-Instruct) is loaded by chatcore from its GGUF, and by transformers from the
safetensors directory chatcore converts it to (identical float32 weights). Prompts are real chat text
of 128 and 2,048 tokens. Decode speed excludes the prefill: it is (N - 1) tokens over the time from the
first sampled token to the last, for both engines (for transformers: generate(N+1) - generate(1)).
The hardware limit is the bytes one decode step must read (float32 weights, plus the KV cache at that
context length) over the copy bandwidth measured in the same run.

Optional columns: ``llama_cpp`` (llama-cpp-python on the same GGUF, same prompts and token counts, as many
threads as torch uses; run through ``--llama-python``, a Python that imports ``llama_cpp``, by default this one;
skipped when it does not import) and ``chatcore_int8`` (the same engine with every projection through fbgemm's
int8 dynamic linear, ``bench/cpu_int8_shim.py``: a bench-only experiment, not a chatcore mode).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
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


def bench_llama_cpp(python: str, gguf: Path, prompts: dict[int, list[int]], new: int, repeats: int
                    ) -> dict | None:
    """llama.cpp's rows (``bench/llama_cpp_decode.py`` under ``python``), or None when llama_cpp is missing."""
    if subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, check=False).returncode != 0:
        print(f"llama.cpp column skipped: {python} cannot import llama_cpp", file=sys.stderr)
        return None
    spec = {"model": str(gguf), "threads": torch.get_num_threads(), "new_tokens": new, "repeats": repeats,
            "prompts": {str(n): ids for n, ids in prompts.items()}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    done = subprocess.run([python, str(Path(__file__).with_name("llama_cpp_decode.py")), f.name],
                          capture_output=True, text=True, check=False)
    Path(f.name).unlink()
    if done.returncode != 0:
        print(f"llama.cpp column skipped: it exited {done.returncode} ({done.stderr.strip()[-300:]})",
              file=sys.stderr)
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("cpu_decode.json")))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llama-python", default=sys.executable)
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 (fbgemm) experiment column")
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
    prompts = {n: prompt_ids(engine, n) for n in (128, 2048)}
    if not args.no_int8:
        sys.path.insert(0, str(Path(__file__).parent))
        from cpu_int8_shim import installed
    for n, ids in prompts.items():
        # Interleaved, one repeat of each at a time, so drift in a shared machine's speed hits both alike.
        runs = [(bench_ours(engine, ids, args.new_tokens, 1), bench_hf(ref, ids, args.new_tokens, 1))
                for _ in range(args.repeats)]
        ours = {k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}
        theirs = {k: statistics.median(r[1][k] for r in runs) for k in runs[0][1]}
        limit = bandwidth / (weight_bytes + kv_bytes_per_token * n)  # tok/s if each step read its bytes once
        extra: dict = {}
        if not args.no_int8:
            with installed():
                bench_ours(engine, ids, 2, 1)   # packs the weights
                int8 = [bench_ours(engine, ids, args.new_tokens, 1) for _ in range(args.repeats)]
            extra["chatcore_int8"] = {k: statistics.median(r[k] for r in int8) for k in int8[0]}
            extra["int8_decode_vs_float32"] = extra["chatcore_int8"]["decode_tok_s"] / ours["decode_tok_s"]
        rows.append({
            "prompt_tokens": n, "chatcore": ours, "transformers": theirs, **extra,
            "decode_speedup": ours["decode_tok_s"] / theirs["decode_tok_s"],
            "prefill_speedup": ours["prefill_tok_s"] / theirs["prefill_tok_s"],
            "bandwidth_limit_tok_s": limit,
            "decode_fraction_of_bandwidth_limit": ours["decode_tok_s"] / limit,
        })
    llama = bench_llama_cpp(args.llama_python, gguf, prompts, args.new_tokens, args.repeats)
    for r in rows:
        if llama is not None and "rows" in llama:
            r["llama_cpp"] = llama["rows"][str(r["prompt_tokens"])]
            r["decode_vs_llama_cpp"] = r["chatcore"]["decode_tok_s"] / r["llama_cpp"]["decode_tok_s"]
            if "chatcore_int8" in r:
                r["int8_decode_vs_llama_cpp"] = r["chatcore_int8"]["decode_tok_s"] / r["llama_cpp"]["decode_tok_s"]
    result = {
        "model": "SmolLM2-135M-Instruct (demo GGUF, float32 on the CPU)",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "copy_bandwidth_GBps": bandwidth / 1e9},
        "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes_per_token, "new_tokens": args.new_tokens,
        "llama_cpp": {k: v for k, v in (llama or {}).items() if k != "rows"} or None,
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
    for r in rows:
        if "chatcore_int8" in r:
            print(f"{r['prompt_tokens']:>7} int8 (fbgemm shim) decode {r['chatcore_int8']['decode_tok_s']:.1f} tok/s "
                  f"= {r['int8_decode_vs_float32']:.2f}x float32")
        if "llama_cpp" in r:
            print(f"{r['prompt_tokens']:>7} llama.cpp decode {r['llama_cpp']['decode_tok_s']:.1f} tok/s, "
                  f"chatcore / llama.cpp = {r['decode_vs_llama_cpp']:.2f}")


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
    for i, r in enumerate(result["rows"]):
        for dx, key, style in ((-0.2, "chatcore_int8", "g^"), (0.2, "llama_cpp", "rs")):
            if key in r:
                axes[0].plot([i + dx], [r[key]["decode_tok_s"]], style, label=key if i == 0 else None)
    limits = [r["bandwidth_limit_tok_s"] for r in result["rows"]]
    axes[0].plot(range(len(labels)), limits, "k_", ms=30, label="bandwidth limit")
    axes[0].legend(fontsize=8)
    fig.suptitle(result["model"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
