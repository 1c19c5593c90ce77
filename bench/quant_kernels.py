"""Packed-weight kernels on the GPU: the fused dequant-GEMV (chatcore.layers.triton_qgemv) per format and linear
shape, against bf16 cuBLAS (F.linear) and PyTorch's int4 tinygemm, plus dequantize_to (the prefill path).

Usage (on the GPU machine): python bench/quant_kernels.py --out DIR [--models 8b 70b 1b]
    [--formats q4_k q6_k q4_0 q8_0 int4_g64 int4_g128 int8 fp8] [--budget 140] [--no-sweep]
    [--sweep-formats q4_k q8_0 q6_k int4_g128] [--parts linears dequantize prefill sweep qmm]
    [--qmm-formats q4_k q8_0 int4_g64 fp8] [--qmm-rows 1 2 4 8 16 32 64 256] [--qmm-sweep-formats q4_k q8_0]
    [--qmm-parts table sweep]

Weights are random planes at the real shapes (the speed of these kernels does not depend on the values). The
linear shapes of a layer are the ones a decode step runs: fused q/k/v, o, fused gate/up (through
``qgemv_gate_up_silu``; cuBLAS and tinygemm run it as one plain [2I, hidden] product), down, and the head.
Times are device times of calls captured in a CUDA graph (chatcore.layers.timing.graph_seconds); each captured
call reads another copy of the weight (copies enough for ~200 MB), so the 50 MB L2 does not hold the weight
between calls. GB/s counts the bytes a call must read (packed planes with scales; bf16 weight; tinygemm's
packed int4 + scales), % against 4.2 TB/s (the H200's measured copy bandwidth).

Parts, in order, each skipped once ``--budget`` seconds have passed (the run still writes what it has):
1. per model, shape and format: qgemv, bf16, tinygemm (group 64 / 128), and a per-token total of the linears
   of the whole layer stack (layers x (qkv + o + gate/up + down) + head) -> ms/token and its tok/s ceiling;
2. dequantize_to (8B shapes, bf16 out): GB/s of bytes read + written;
3. prefill: dequantize_to + cuBLAS vs bf16 cuBLAS for prompt chunks of 256 and 2048 tokens (8B shapes);
4. a sweep of launch shapes (block_n, block_k, warps, stages) per 8B shape and ``--sweep-formats``, each checked
   against the default's output: the fastest per (shape, format), to fill ``launch_config``'s table;
5. ``qmm`` (only when ``--parts`` names it; bench/quant_qmm.py): the fused dequant-GEMM at small M against bf16
   cuBLAS, dequantize_to + cuBLAS, tinygemm and (M = 1) the GEMV, a sweep of its launch shapes, and a suggested
   ``chatcore.layers.qmm_choice.QMM_ROWS``.
``--parts`` picks parts (default: 1-4, as before).
Writes DIR/quant_kernels.json (after each part) and DIR/quant_kernels.png (when matplotlib imports), then
prints a short table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from chatcore.layers.timing import graph_seconds
from chatcore.layers.triton_dequant import dequantize_to
from chatcore.layers.triton_qgemv import QConfig, launch_config, qgemv, qgemv_gate_up_silu, tile_k
from chatcore.quant.packed import PackedWeight, QuantFormat

PEAK = 4.2e12          # bytes/s: the H200's measured device copy bandwidth
DEVICE = "cuda"
COLD_BYTES = 200e6     # weight copies per timing: at least this many bytes in all (the L2 holds 50 MB)

MODELS = {  # name -> (hidden, q, kv, intermediate, vocab, layers)
    "1b": (2048, 2048, 512, 8192, 128256, 16),
    "8b": (4096, 4096, 1024, 14336, 128256, 32),
    "70b": (8192, 8192, 1024, 28672, 128256, 80),
}
FORMATS: dict[str, Callable[[int], QuantFormat]] = {
    "q4_k": lambda k: QuantFormat("q4_k", 4, 32, 256, sub_scale=True, offset="dmin"),
    "q6_k": lambda k: QuantFormat("q6_k", 6, 16, 256, zero=32, sub_scale=True),
    "q4_0": lambda k: QuantFormat("q4_0", 4, 32, 32, zero=8),
    "q8_0": lambda k: QuantFormat("q8_0", 8, 32, 32),
    "q5_k": lambda k: QuantFormat("q5_k", 5, 32, 256, sub_scale=True, offset="dmin"),
    "int4_g64": lambda k: QuantFormat("int4_g64", 4, 64, 64, offset="min"),
    "int4_g128": lambda k: QuantFormat("int4_g128", 4, 128, 128, offset="min"),
    "int8": lambda k: QuantFormat("int8", 8, k, k),
    "fp8": lambda k: QuantFormat("fp8", 8, k, k, float_codes=True),
}
DEFAULT_FORMATS = ["q4_k", "q6_k", "q4_0", "q8_0", "int4_g64", "int4_g128", "int8", "fp8"]
SWEEP_FORMATS = ["q4_k", "q8_0", "q6_k", "int4_g128"]
# ptxas (sm_90) counts ~9 SASS instructions per weight in the loop with 4 warps over 4 rows (x's load, norm and
# sums repeated per row, x through shared memory), ~6 with one or two warps over 8-16 rows (the default): the
# sweep tries both kinds.
SWEEP_LOW = [QConfig(4, 1024, 4, 3), QConfig(16, 1024, 1, 3), QConfig(8, 2048, 2, 3), QConfig(4, 1024, 1, 3),
             QConfig(4, 2048, 2, 3), QConfig(16, 2048, 4, 3), QConfig(2, 1024, 4, 3)]
SWEEP_BYTE = [QConfig(4, 512, 4, 3), QConfig(8, 512, 1, 3), QConfig(4, 1024, 1, 3), QConfig(8, 1024, 2, 3),
              QConfig(16, 512, 2, 3), QConfig(2, 512, 4, 3), QConfig(8, 256, 1, 3)]


def layer_shapes(model: str) -> list[tuple[str, int, int, int]]:
    """(projection, N, K, times per token) of one decode step's linears; gate_up is [2I, hidden]."""
    h, q, kv, inter, vocab, layers = MODELS[model]
    return [("qkv", q + 2 * kv, h, layers), ("o", h, q, layers), ("gate_up", 2 * inter, h, layers),
            ("down", h, inter, layers), ("head", vocab, h, 1)]


def random_packed(fmt: QuantFormat, n: int, k: int) -> PackedWeight:
    """Random planes on the GPU (codes anywhere, scales small)."""
    dev = DEVICE

    def u8(*shape: int, high: int = 256) -> torch.Tensor:
        return torch.randint(0, high, shape, dtype=torch.uint8, device=dev)

    p: dict[str, torch.Tensor] = {}
    if fmt.bits == 8:
        p["q"] = ((torch.randn(n, k, device=dev) * 3).to(torch.float8_e4m3fn) if fmt.float_codes
                  else u8(n, k).view(torch.int8))
    else:
        p["ql"] = u8(n, k // 2)
        if fmt.bits > 4:
            p["qh"] = u8(n, k * (fmt.bits - 4) // 8)
    p["d"] = (torch.rand(n, k // fmt.block, device=dev) * 0.02 + 1e-3).to(
        torch.float32 if fmt.group == k else torch.float16)
    if fmt.sub_scale:
        p["sc"] = u8(n, k // fmt.group, high=64)
        if fmt.bits == 6:
            p["sc"] = p["sc"].view(torch.int8)
    if fmt.offset == "min":
        p["m"] = (torch.randn(n, k // fmt.group, device=dev) * 0.05).half()
    elif fmt.offset == "dmin":
        p["dmin"] = (torch.rand(n, k // fmt.block, device=dev) * 0.01).half()
        p["mn"] = u8(n, k // fmt.group, high=64)
    return PackedWeight(fmt, (n, k), **p)


def copies_for(nbytes: int) -> int:
    return max(1, min(64, math.ceil(COLD_BYTES / max(nbytes, 1))))


def cold_seconds(make: Callable[[], Any], call: Callable[[Any], object], nbytes: int) -> float:
    """Device seconds of ``call(w)`` in a CUDA graph, each captured call on another copy from ``make()``."""
    ws = [make() for _ in range(copies_for(nbytes))]
    order = iter(range(1 << 30))
    return graph_seconds(lambda: call(ws[next(order) % len(ws)]), reps=max(20, len(ws)))


def bf16_seconds(n: int, k: int, x: torch.Tensor) -> float:
    return cold_seconds(lambda: torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16), lambda w: F.linear(x, w),
                        n * k * 2)


def qgemv_seconds(fmt: QuantFormat, n: int, k: int, x: torch.Tensor, gate: bool, nbytes: int,
                  config: QConfig | None = None) -> float:
    fn = qgemv_gate_up_silu if gate else qgemv
    return cold_seconds(lambda: random_packed(fmt, n, k), lambda w: fn(x, w, config=config), nbytes)


def dequant_seconds(fmt: QuantFormat, n: int, k: int, nbytes: int) -> float:
    return cold_seconds(lambda: random_packed(fmt, n, k), lambda w: dequantize_to(w, torch.bfloat16), nbytes)


def tinygemm_seconds(n: int, k: int, group: int, x: torch.Tensor) -> tuple[float, int]:
    """PyTorch's int4 tinygemm (``_weight_int4pack_mm``) on an [n, k] weight: (seconds, bytes read)."""
    packed_u8 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE)
    try:
        wp = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
    except (RuntimeError, TypeError):   # older signature: int32 [n, k] codes
        wp = torch.ops.aten._convert_weight_to_int4pack(
            torch.randint(0, 16, (n, k), dtype=torch.int32, device=DEVICE), 8)
    sz = torch.rand(k // group, n, 2, device=DEVICE).to(torch.bfloat16)
    nbytes = wp.numel() * wp.element_size() + sz.numel() * 2
    t = cold_seconds(lambda: (wp.clone(), sz.clone()),
                     lambda w: torch.ops.aten._weight_int4pack_mm(x, w[0], group, w[1]), nbytes)
    return t, nbytes


def sweep_seconds(fmt: QuantFormat, n: int, k: int, x: torch.Tensor, gate: bool, w0: PackedWeight,
                  want: torch.Tensor, cfg: QConfig) -> float:
    """One launch shape: its output checked against the default launch's, then timed."""
    got = (qgemv_gate_up_silu if gate else qgemv)(x, w0, config=cfg).float()
    if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
        raise AssertionError(f"{cfg} differs from the default launch's output")
    return qgemv_seconds(fmt, n, k, x, gate, w0.nbytes(), cfg)


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        import triton

        self.args = args
        self.start = time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "triton": triton.__version__, "peak_bytes_per_s": PEAK, "linears": [],
                                    "stacks": [], "dequantize": [], "prefill": [], "sweep": [], "skipped": [],
                                    "errors": []}

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def save(self) -> None:
        (self.out / "quant_kernels.json").write_text(json.dumps(self.res, indent=1))

    def guarded(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:   # noqa: BLE001 - one failed measurement must not end the run
            first = str(e).splitlines()[0][:200] if str(e) else ""
            self.res["errors"].append(f"{what}: {type(e).__name__}: {first}")
            return None
        finally:
            torch.cuda.empty_cache()

    # -- 1. decode linears --------------------------------------------------------------------------------------
    def linears(self, model: str) -> None:
        shapes = layer_shapes(model)
        per: dict[str, dict[str, tuple[float, int]]] = {}   # kernel -> proj -> (seconds, bytes)
        for proj, n, k, _times in shapes:
            if self.left() < 0:
                self.res["skipped"].append(f"linears {model} {proj}")
                continue
            x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
            nb = n * k * 2
            t = self.guarded(f"bf16 {model} {proj}", bf16_seconds, n, k, x)
            row: dict[str, Any] = {"model": model, "proj": proj, "n": n, "k": k, "bf16_s": t, "bf16_bytes": nb}
            if t:
                per.setdefault("bf16", {})[proj] = (t, nb)
            for group in (64, 128):
                tg = self.guarded(f"tinygemm g{group} {model} {proj}", tinygemm_seconds, n, k, group, x)
                row[f"tinygemm_g{group}_s"] = tg[0] if tg else None
                if tg:
                    per.setdefault(f"tinygemm_g{group}", {})[proj] = tg
            self.res["linears"].append(row)
            for name in self.args.formats:
                if self.left() < 0:
                    self.res["skipped"].append(f"linears {model} {proj} {name}")
                    continue
                fmt = FORMATS[name](k)
                pb = random_packed(fmt, n, k).nbytes()
                gate = proj == "gate_up"
                tq = self.guarded(f"qgemv {name} {model} {proj}", qgemv_seconds, fmt, n, k, x, gate, pb)
                cfg = launch_config(n // 2 if gate else n, k, fmt, gate)
                tg64 = row["tinygemm_g64_s"]
                self.res["linears"].append({
                    "model": model, "proj": proj, "n": n, "k": k, "format": name, "bytes": pb, "qgemv_s": tq,
                    "gb_s": pb / tq / 1e9 if tq else None, "pct_peak": 100 * pb / tq / PEAK if tq else None,
                    "vs_bf16": t / tq if (t and tq) else None, "vs_tinygemm_g64": tg64 / tq if (tg64 and tq) else None,
                    "config": cfg.__dict__ | {"block_k": tile_k(fmt, k, cfg.block_k)}})
                if tq:
                    per.setdefault(name, {})[proj] = (tq, pb)
            self.save()
        for kernel, got in per.items():
            if len(got) != len(shapes):
                continue
            secs = sum(got[p][0] * times for p, _, _, times in shapes)
            nbytes = sum(got[p][1] * times for p, _, _, times in shapes)
            self.res["stacks"].append({"model": model, "kernel": kernel, "linears_ms_per_token": secs * 1e3,
                                       "bytes_per_token": nbytes, "tok_s_ceiling": 1 / secs,
                                       "pct_peak": 100 * nbytes / secs / PEAK})
        self.save()

    # -- 2. dequantize_to ---------------------------------------------------------------------------------------
    def dequantize(self) -> None:
        for proj, n, k, _ in layer_shapes("8b"):
            for name in self.args.formats:
                if self.left() < 0:
                    self.res["skipped"].append(f"dequantize {proj} {name}")
                    continue
                fmt = FORMATS[name](k)
                nb = random_packed(fmt, n, k).nbytes() + n * k * 2
                t = self.guarded(f"dequantize {name} {proj}", dequant_seconds, fmt, n, k, nb)
                self.res["dequantize"].append({"proj": proj, "n": n, "k": k, "format": name, "seconds": t,
                                               "gb_s": nb / t / 1e9 if t else None,
                                               "pct_peak": 100 * nb / t / PEAK if t else None})
        self.save()

    # -- 3. prefill: dequantize per chunk + cuBLAS vs bf16 cuBLAS -----------------------------------------------
    def prefill(self) -> None:
        for proj, n, k, _ in layer_shapes("8b"):
            if self.left() < 0:
                self.res["skipped"].append(f"prefill {proj}")
                continue
            w16 = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
            for m in (256, 2048):
                x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
                tb = self.guarded(f"prefill bf16 {proj} {m}", graph_seconds, partial(F.linear, x, w16), 5)
                for name in ("q4_k", "q8_0"):
                    if self.left() < 0 or name not in self.args.formats:
                        continue
                    w = random_packed(FORMATS[name](k), n, k)
                    tq = self.guarded(f"prefill {name} {proj} {m}", graph_seconds, partial(dequant_linear, x, w), 5)
                    self.res["prefill"].append({"proj": proj, "n": n, "k": k, "tokens": m, "format": name,
                                                "bf16_s": tb, "dequant_then_cublas_s": tq,
                                                "ratio": tq / tb if (tq and tb) else None})
            del w16
            torch.cuda.empty_cache()
        self.save()

    # -- 4. launch-shape sweep ----------------------------------------------------------------------------------
    def sweep(self) -> None:
        for name in self.args.sweep_formats:
            for proj, n, k, _ in layer_shapes("8b"):
                if self.left() < 0:
                    self.res["skipped"].append(f"sweep {name} {proj}")
                    continue
                fmt = FORMATS[name](k)
                gate = proj == "gate_up"
                x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
                w0 = random_packed(fmt, n, k)
                pb = w0.nbytes()
                want = (qgemv_gate_up_silu if gate else qgemv)(x, w0).float()
                best: tuple[float, QConfig] | None = None
                default = launch_config(n // 2 if gate else n, k, fmt, gate)
                sweep = [default] + [c for c in (SWEEP_BYTE if fmt.bits == 8 else SWEEP_LOW) if c != default]
                for cfg in sweep:
                    if self.left() < 0:
                        break
                    t = self.guarded(f"sweep {name} {proj} {cfg}", sweep_seconds, fmt, n, k, x, gate, w0, want, cfg)
                    self.res["sweep"].append({"format": name, "proj": proj, "n": n, "k": k, "config": cfg.__dict__,
                                              "seconds": t, "gb_s": pb / t / 1e9 if t else None})
                    if t and (best is None or t < best[0]):
                        best = (t, cfg)
                if best:
                    self.res["sweep"].append({"format": name, "proj": proj, "best": best[1].__dict__,
                                              "gb_s": pb / best[0] / 1e9})
            self.save()


def dequant_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    return F.linear(x, dequantize_to(w, torch.bfloat16))


def plot(res: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in res["linears"] if r.get("model") == "8b" and r.get("gb_s")]
    projs = [p for p, *_ in layer_shapes("8b")]
    order = DEFAULT_FORMATS + ["q5_k"]
    fmts = sorted({r["format"] for r in rows}, key=order.index)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(len(fmts) + 1, 1)
    for i, name in enumerate(fmts):
        vals = [next((r["gb_s"] for r in rows if r["format"] == name and r["proj"] == p), 0) for p in projs]
        ax.bar([j + i * width for j in range(len(projs))], vals, width, label=name)
    bf = [next((r["bf16_bytes"] / r["bf16_s"] / 1e9 for r in res["linears"] if r.get("model") == "8b"
                and r.get("proj") == p and "format" not in r and r.get("bf16_s")), 0) for p in projs]
    ax.bar([j + len(fmts) * width for j in range(len(projs))], bf, width, label="bf16 cuBLAS", color="grey")
    ax.axhline(PEAK / 1e9, color="k", ls="--", lw=0.8)
    ax.set_xticks([j + 0.4 for j in range(len(projs))], projs)
    ax.set_ylabel("GB/s of weight bytes read")
    ax.set_title("Llama-3.1-8B decode linears: packed GEMV per format (H200, CUDA graph)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(res: dict[str, Any]) -> str:
    lines = ["model  kernel        linears ms/tok  tok/s ceiling  % of 4.2 TB/s   GB/token"]
    for s in res["stacks"]:
        lines.append(f"{s['model']:<6} {s['kernel']:<13} {s['linears_ms_per_token']:>14.3f}"
                     f" {s['tok_s_ceiling']:>14.0f} {s['pct_peak']:>14.1f} {s['bytes_per_token'] / 1e9:>10.2f}")
    for name in DEFAULT_FORMATS + ["q5_k"]:
        rows = [r for r in res["linears"] if r.get("format") == name and r.get("model") == "8b" and r.get("gb_s")]
        if rows:
            lines.append(f"8b {name:<10} GB/s (% peak, x bf16, x tinygemm g64): " + ", ".join(
                f"{r['proj']} {r['gb_s']:.0f} ({r['pct_peak']:.0f}%, {r['vs_bf16'] or 0:.2f}x, "
                f"{r['vs_tinygemm_g64'] or 0:.2f}x)" for r in rows))
    best = [r for r in res["sweep"] if "best" in r]
    if best:
        lines.append("sweep (8B): fastest launch per shape: " + "; ".join(
            f"{r['format']}/{r['proj']} {r['best']['block_n']}x{r['best']['block_k']} w{r['best']['num_warps']}"
            f" s{r['best']['num_stages']} {r['gb_s']:.0f} GB/s" for r in best))
    deq = [r for r in res["dequantize"] if r.get("gb_s")]
    if deq:
        lines.append("dequantize_to (8B, bf16 out) GB/s r+w: " + ", ".join(
            f"{r['format']}/{r['proj']} {r['gb_s']:.0f}" for r in deq))
    pre = [r for r in res["prefill"] if r.get("ratio")]
    if pre:
        lines.append("prefill dequantize+cuBLAS / bf16: " + ", ".join(
            f"{r['format']}/{r['proj']}/{r['tokens']} {r['ratio']:.2f}" for r in pre))
    if res.get("qmm_suggest") or res.get("qmm_sweep"):
        from quant_qmm import table as qmm_table

        lines.extend(qmm_table(res))
    if res["errors"]:
        lines.append(f"{len(res['errors'])} measurements failed (see errors in the JSON), first: {res['errors'][0]}")
    if res["skipped"]:
        lines.append(f"skipped for the time budget: {len(res['skipped'])} (first: {res['skipped'][0]})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench", help="directory for quant_kernels.json / .png")
    ap.add_argument("--models", nargs="+", default=["8b", "70b", "1b"], choices=sorted(MODELS))
    ap.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS, choices=sorted(FORMATS))
    ap.add_argument("--budget", type=float, default=140.0, help="seconds after which remaining parts are skipped")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-formats", nargs="+", default=SWEEP_FORMATS, choices=sorted(FORMATS))
    ap.add_argument("--parts", nargs="+", default=["linears", "dequantize", "prefill", "sweep"],
                    choices=["linears", "dequantize", "prefill", "sweep", "qmm"])
    ap.add_argument("--qmm-formats", nargs="+", default=["q4_k", "q8_0", "int4_g64", "fp8"], choices=sorted(FORMATS))
    ap.add_argument("--qmm-rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 256])
    ap.add_argument("--qmm-sweep-formats", nargs="+", default=["q4_k", "q8_0"], choices=sorted(FORMATS))
    ap.add_argument("--qmm-parts", nargs="+", default=["table", "sweep"], choices=["table", "sweep"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/quant_kernels.py needs a CUDA GPU")
    run = Run(args)
    if "linears" in args.parts:
        for model in args.models:
            run.linears(model)
    if "dequantize" in args.parts:
        run.dequantize()
    if "prefill" in args.parts:
        run.prefill()
    if "sweep" in args.parts and not args.no_sweep:
        run.sweep()
    if "qmm" in args.parts:
        from quant_qmm import run_qmm

        run_qmm(run)
    run.res["seconds"] = time.perf_counter() - run.start
    run.save()
    run.guarded("plot", lambda: plot(run.res, run.out / "quant_kernels.png"))
    print(table(run.res))


if __name__ == "__main__":
    main()
