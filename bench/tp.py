"""Tensor-parallel decode speed: Llama-3.1-70B-shaped random weights at TP=2/4/8 (or 8B at TP=1/2), bf16,
one process per GPU over NCCL, CUDA-graph decode.

Usage (on a machine with 2-8 GPUs): python bench/tp.py --out DIR [--model llama-3.1-70b] [--tp 2 4 8]
    [--contexts 512 8192] [--new 128]
The CPU path of the same code (gloo, a tiny shape, TP=1/2): python bench/tp.py --device cpu --tiny --out DIR

For each TP size and context: decode tokens/s (``--new`` greedy tokens after a prompt of that many tokens
held in the cache; the second generation on the slot, so CUDA graphs are captured already); the per-GPU
roofline: the bytes one step reads on one GPU (its shard of every weight the step multiplies by: q/k/v/o,
gate/up/down, its vocab rows of the head; plus its KV heads over the context) over the device-to-device copy
bandwidth measured on cuda:0 in this run (read + write counted); the fraction of it reached; and the all-reduce
time per token: one all-reduce of a token's hidden state timed in a loop on every rank, times the
2 x layers + 1 a step runs (the logits' all-gather is not in it). Weights are random (a rank makes its own
shard on its GPU, see ``chatcore.parallel.random_weights``): nothing of 140 GB is written to disk.
Results go to DIR/tp.json (rewritten after each run, so a run cut short keeps what it measured) and DIR/tp.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# the GPU machines forbid NVLink multicast (NVLS): keep it off in this process and the ranks it starts
for _var, _val in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_var, _val)

import torch  # noqa: E402

from chatcore import SamplingParams  # noqa: E402
from chatcore.checkpoint import LoadOptions  # noqa: E402
from chatcore.checkpoint_config import config_from_hf_file  # noqa: E402
from chatcore.config import ModelConfig  # noqa: E402
from chatcore.parallel.launch import load_parallel  # noqa: E402
from chatcore.parallel.shard import RankShard  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1024),
}


def write_config(name: str, directory: Path) -> Path:
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 131072,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": False,
           "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, **SHAPES[name]}
    (directory / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    return directory


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device (or memory-to-memory) copy, read + write counted; median of 10."""
    n = (512 if device.type == "cuda" else 64) * 1024 * 1024
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times)


def step_bytes(cfg: ModelConfig, n: int, context: int, elem: int) -> int:
    """Bytes one decode step reads on rank 0: its weight shard (what the step multiplies by) and its KV."""
    shard = RankShard(cfg, n, 0)
    local = shard.local_config()
    d, h = cfg.head_dim, cfg.hidden_size
    attn = (2 * local.num_heads + 2 * local.num_kv_heads) * d * h
    mlp = 3 * local.intermediate_size * h
    weights = cfg.num_layers * (attn + mlp) + shard.vocab_rows * h
    kv = 2 * cfg.num_layers * local.num_kv_heads * context * d
    return (weights + kv) * elem


def run_one(cfg_dir: Path, cfg: ModelConfig, n: int, contexts: list[int], new: int, device: str,
            dtype: str, bandwidth: float, graphs: bool) -> list[dict[str, Any]]:
    window = max(contexts) + new + 16
    t0 = time.perf_counter()
    options = LoadOptions(max_seq_len=window, prefill_chunk=2048, cuda_graphs=graphs)
    engine = load_parallel(cfg_dir, n, device, dtype, options, random_seed=0)
    load_s = time.perf_counter() - t0
    out = []
    try:
        ar_s = engine.model.time_all_reduce(200) if n > 1 else 0.0
        elem = torch.empty((), dtype=engine.runtime.dtype).element_size()
        for context in contexts:
            g = torch.Generator().manual_seed(context)
            prompt = torch.randint(3, cfg.vocab_size, (context,), generator=g).tolist()
            slot = engine.new_slot()
            warm = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
            list(engine.generate(prompt, warm, slot=slot))   # prefill, graph capture
            params = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
            stats = list(engine.generate(prompt, params, slot=slot))[-1].stats
            nbytes = step_bytes(cfg, n, context, elem)
            roofline = bandwidth / nbytes
            row = dict(tp=n, context=context, decode_tok_s=stats.decode_tokens_per_s, roofline_tok_s=roofline,
                       roofline_fraction=stats.decode_tokens_per_s / roofline, step_bytes_per_gpu=nbytes,
                       all_reduce_us=ar_s * 1e6, all_reduce_us_per_token=ar_s * 1e6 * (2 * cfg.num_layers + 1),
                       load_s=load_s)
            print(json.dumps(row), flush=True)
            out.append(row)
            del slot
    finally:
        engine.close()
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["runs"]
    contexts = sorted({r["context"] for r in rows})
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for ctx in contexts:
        sel = [r for r in rows if r["context"] == ctx]
        tps = [r["tp"] for r in sel]
        a.plot(tps, [r["decode_tok_s"] for r in sel], "o-", label=f"measured, context {ctx}")
        a.plot(tps, [r["roofline_tok_s"] for r in sel], "x--", label=f"per-GPU roofline, context {ctx}")
        b.plot(tps, [r["all_reduce_us_per_token"] / 1e3 for r in sel], "o-", label=f"context {ctx}")
    a.set(xlabel="tensor-parallel ranks", ylabel="decode tokens/s", title=f"{results['model']} ({results['device']})")
    b.set(xlabel="tensor-parallel ranks", ylabel="ms of all-reduce per token", title="all-reduce time per token")
    for ax in (a, b):
        ax.set_xticks(sorted({r["tp"] for r in rows}))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--model", default="llama-3.1-70b", choices=[m for m in SHAPES if m != "tiny"])
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama shape (the CPU check of this script)")
    ap.add_argument("--tp", nargs="+", type=int, default=None, help="sizes (default: 2 4 8 up to the GPUs; CPU: 1 2)")
    ap.add_argument("--contexts", nargs="+", type=int, default=None, help="default 512 8192 (tiny: 32)")
    ap.add_argument("--new", type=int, default=None, help="decode tokens measured (default 128; tiny: 16)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-graphs", action="store_true", help="eager decode (if NCCL collectives fail to capture)")
    args = ap.parse_args()
    name = "tiny" if args.tiny else args.model
    dev = torch.device(args.device)
    if args.tp:
        sizes = args.tp
    elif dev.type == "cpu":
        sizes = [1, 2]
    else:
        sizes = [n for n in (2, 4, 8) if n <= torch.cuda.device_count()]
    contexts = args.contexts or ([32] if args.tiny else [512, 8192])
    new = args.new or (16 if args.tiny else 128)
    dtype = "float32" if dev.type == "cpu" else "bfloat16"
    args.out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    results: dict[str, Any] = {"model": name, "device": device_name, "gpus": torch.cuda.device_count(),
                               "dtype": dtype, "torch": torch.__version__, "new_tokens": new,
                               "cuda_graphs": dev.type == "cuda" and not args.no_graphs,
                               "copy_bandwidth_gb_s": None, "runs": []}
    bandwidth = copy_bandwidth(dev)
    results["copy_bandwidth_gb_s"] = bandwidth / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        cfg_dir = write_config(name, Path(tmp))
        cfg = config_from_hf_file(cfg_dir / "config.json")
        for n in sizes:
            results["runs"] += run_one(cfg_dir, cfg, n, contexts, new, args.device, dtype, bandwidth,
                                       not args.no_graphs)
            (args.out / "tp.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    plot(results, args.out / "tp.png")
    print(f"wrote {args.out / 'tp.json'} and {args.out / 'tp.png'}")


if __name__ == "__main__":
    main()
