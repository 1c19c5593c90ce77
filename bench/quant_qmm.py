"""The ``qmm`` part of bench/quant_kernels.py: the fused dequant-GEMM (chatcore.layers.triton_qmm) at small M.

Per 8B linear shape (qkv, o, gate_up as one plain [2I, hidden] product, down), ``--qmm-formats`` and M in
``--qmm-rows``: qmm (default launch) against bf16 cuBLAS at the same M, dequantize_to + cuBLAS (the prefill path),
PyTorch's int4 tinygemm (``_weight_int4pack_mm``, group 64), and at M = 1 the fused GEMV (qgemv). Then a sweep
of launch shapes (block_n, block_k, split_k, warps, stages; block_m from M) for ``--qmm-sweep-formats`` at a few
M, each checked against the default's output, within what is left of ``--budget`` (``--qmm-parts`` picks the
table, the sweep or both). Times are device times in a CUDA graph, each captured call on another copy of the
weight (as bench/quant_kernels.py times them). The summary suggests ``chatcore.layers.qmm_choice.QMM_ROWS``
from the totals over the four shapes. ``python bench/quant_qmm.py --ptxas`` compiles the kernel for sm_90
without a GPU and reports what ptxas makes of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from chatcore.layers.activation import silu_mul
from chatcore.layers.timing import graph_seconds
from chatcore.layers.triton_dequant import dequantize_to
from chatcore.layers.triton_qgemv import qgemv
from chatcore.layers.triton_qmm import MMConfig, mm_config, qmm, qmm_gate_up_silu, rows_tile

QMM_FORMATS = ["q4_k", "q8_0", "int4_g64", "fp8"]
QMM_ROWS = [1, 2, 4, 8, 16, 32, 64, 256]
QMM_SWEEP_FORMATS = ["q4_k", "q8_0"]
SWEEP_ROWS = [16, 1, 64, 256, 4]
# (block_n, block_k, split_k, warps, stages); block_m is the default's for the M swept
SWEEP = [(64, 256, 1, 4, 3), (64, 256, 2, 4, 3), (128, 128, 1, 4, 3), (128, 256, 2, 8, 3), (32, 256, 1, 2, 3),
         (32, 512, 2, 2, 4), (16, 512, 1, 1, 3), (64, 128, 4, 4, 4), (64, 512, 1, 4, 2), (256, 64, 1, 8, 3),
         (128, 64, 2, 4, 5), (16, 1024, 4, 1, 3)]
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]


def copies(make: Callable[[], Any], nbytes: int) -> list[Any]:
    from quant_kernels import copies_for

    return [make() for _ in range(copies_for(nbytes))]


def cold(ws: list[Any], call: Callable[[Any], object]) -> float:
    """Device seconds of ``call(w)`` in a CUDA graph, each captured call on the next copy in ``ws``."""
    order = iter(range(1 << 30))
    return graph_seconds(lambda: call(ws[next(order) % len(ws)]), reps=max(20, len(ws)))


def tinygemm_copies(n: int, k: int, group: int) -> tuple[list[Any], int]:
    from quant_kernels import DEVICE

    packed_u8 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE)
    try:
        wp = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
    except (RuntimeError, TypeError):   # older signature: int32 [n, k] codes
        wp = torch.ops.aten._convert_weight_to_int4pack(
            torch.randint(0, 16, (n, k), dtype=torch.int32, device=DEVICE), 8)
    sz = torch.rand(k // group, n, 2, device=DEVICE).to(torch.bfloat16)
    nbytes = wp.numel() * wp.element_size() + sz.numel() * 2
    return copies(lambda: (wp.clone(), sz.clone()), nbytes), nbytes


def run_qmm(run: Any) -> None:  # noqa: ANN401 - quant_kernels.Run
    """Part 5 of bench/quant_kernels.py: fills run.res["qmm"] and ["qmm_suggest"] (``--qmm-parts table``), and
    ["qmm_sweep"] (``sweep``)."""
    from quant_kernels import DEVICE, FORMATS, random_packed

    args, res = run.args, run.res
    res.setdefault("qmm", [])
    res.setdefault("qmm_sweep", [])
    if "table" in args.qmm_parts:
        table_part(run)
    if "sweep" in args.qmm_parts:
        sweep(run, random_packed, FORMATS, DEVICE)
    run.save()


def table_part(run: Any) -> None:  # noqa: ANN401 - quant_kernels.Run
    """The main table: every kernel per shape, format and M (default launches)."""
    from quant_kernels import DEVICE, FORMATS, random_packed

    args, res = run.args, run.res
    for proj, n, k in SHAPES:
        if run.left() < 0:
            res["skipped"].append(f"qmm {proj}")
            continue
        xs = {m: torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16) for m in args.qmm_rows}
        w16 = copies(lambda n=n, k=k: torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16), n * k * 2)
        base: dict[int, dict[str, Any]] = {}
        for m, x in xs.items():
            base[m] = {"bf16_s": run.guarded(f"qmm bf16 {proj} {m}", cold, w16, lambda w, x=x: F.linear(x, w))}
        del w16
        tg = run.guarded(f"qmm tinygemm {proj}", tinygemm_copies, n, k, 64)
        for m, x in xs.items():
            if tg:
                base[m]["tinygemm_g64_s"] = run.guarded(
                    f"qmm tinygemm {proj} {m}", cold, tg[0],
                    lambda w, x=x: torch.ops.aten._weight_int4pack_mm(x, w[0], 64, w[1]))
        del tg
        torch.cuda.empty_cache()
        for name in args.qmm_formats:
            if run.left() < 0:
                res["skipped"].append(f"qmm {proj} {name}")
                continue
            fmt = FORMATS[name](k)
            pb = random_packed(fmt, n, k).nbytes()
            ws = copies(lambda fmt=fmt, n=n, k=k: random_packed(fmt, n, k), pb)
            for m, x in xs.items():
                if run.left() < 0:
                    res["skipped"].append(f"qmm {proj} {name} {m}")
                    continue
                row: dict[str, Any] = {"proj": proj, "n": n, "k": k, "m": m, "format": name, "bytes": pb,
                                       **base[m], "config": mm_config(m, n, k, fmt).__dict__}
                row["qmm_s"] = run.guarded(f"qmm {name} {proj} {m}", cold, ws, lambda w, x=x: qmm(x, w))
                row["dequant_cublas_s"] = run.guarded(f"qmm dequant+cublas {name} {proj} {m}", cold, ws,
                                                      lambda w, x=x: F.linear(x, dequantize_to(w, x.dtype)))
                if m == 1:
                    row["qgemv_s"] = run.guarded(f"qmm qgemv {name} {proj}", cold, ws, lambda w, x=x: qgemv(x, w))
                if proj == "gate_up":   # the fused activation against the product + silu_mul
                    row["qmm_gate_up_silu_s"] = run.guarded(f"qmm gate_up_silu {name} {m}", cold, ws,
                                                            lambda w, x=x: qmm_gate_up_silu(x, w))
                    row["qmm_then_silu_s"] = run.guarded(f"qmm then silu {name} {m}", cold, ws,
                                                         lambda w, x=x: silu_mul(qmm(x, w)))
                t = row["qmm_s"]
                for other in ("bf16_s", "dequant_cublas_s", "tinygemm_g64_s", "qgemv_s"):
                    if t and row.get(other):
                        row[f"vs_{other[:-2]}"] = row[other] / t
                row["gb_s"] = pb / t / 1e9 if t else None
                res["qmm"].append(row)
            del ws
            torch.cuda.empty_cache()
            run.save()
    res["qmm_suggest"] = suggest(res["qmm"])
    run.save()


def sweep(run: Any, random_packed: Callable[..., Any], formats: dict[str, Any], device: str) -> None:  # noqa: ANN401
    """Launch shapes per (format, shape, M), most useful M first, while the budget lasts."""
    res = run.res
    for m in SWEEP_ROWS:
        for name in run.args.qmm_sweep_formats:
            for proj, n, k in SHAPES:
                if run.left() < 0:
                    res["skipped"].append(f"qmm sweep {name} {proj} {m}")
                    continue
                fmt = formats[name](k)
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                w0 = random_packed(fmt, n, k)
                ws = copies(lambda fmt=fmt, n=n, k=k: random_packed(fmt, n, k), w0.nbytes())
                want = qmm(x, w0).float()
                best: tuple[float, dict[str, int]] | None = None
                for bn, bk, split, warps, stages in SWEEP:
                    if run.left() < 0:
                        break
                    cfg = MMConfig(rows_tile(m), bn, bk, split, warps, stages)
                    t = run.guarded(f"qmm sweep {name} {proj} {m} {cfg}", sweep_one, x, w0, ws, want, cfg)
                    res["qmm_sweep"].append({"format": name, "proj": proj, "m": m, "config": cfg.__dict__,
                                             "seconds": t})
                    if t and (best is None or t < best[0]):
                        best = (t, cfg.__dict__)
                if best:
                    res["qmm_sweep"].append({"format": name, "proj": proj, "m": m, "best": best[1],
                                             "seconds": best[0], "gb_s": w0.nbytes() / best[0] / 1e9})
                del ws
                torch.cuda.empty_cache()
            run.save()


def sweep_one(x: torch.Tensor, w0: Any, ws: list[Any], want: torch.Tensor, cfg: MMConfig) -> float:  # noqa: ANN401
    """One launch shape: its output checked against the default launch's, then timed."""
    got = qmm(x, w0, config=cfg).float()
    if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
        raise AssertionError(f"{cfg} differs from the default launch's output")
    return cold(ws, lambda w: qmm(x, w, config=cfg))


def suggest(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per format: totals over the four shapes per M, and the rows where qmm is faster than dequantize_to +
    cuBLAS (and at M = 1 than the GEMV): a ``QMM_ROWS`` range (the longest run of winning M from the smallest)."""
    out: dict[str, Any] = {}
    for name in sorted({r["format"] for r in rows}):
        per_m: dict[int, dict[str, float]] = {}
        for r in rows:
            if r["format"] != name:
                continue
            tot = per_m.setdefault(r["m"], {})
            for key in ("qmm_s", "dequant_cublas_s", "bf16_s", "qgemv_s", "tinygemm_g64_s"):
                if r.get(key):
                    tot[key] = tot.get(key, 0.0) + r[key]
                    tot[f"n_{key}"] = tot.get(f"n_{key}", 0) + 1
        full = {m: t for m, t in per_m.items() if t.get("n_qmm_s") == len(SHAPES)}
        wins = []
        for m in sorted(full):
            t = full[m]
            rival = t.get("qgemv_s") if m == 1 else t.get("dequant_cublas_s")
            wins.append((m, bool(rival and t["qmm_s"] < rival)))
        lo = next((m for m, w in wins if w), None)
        hi = None
        if lo is not None:
            for m, w in wins:
                if m >= lo:
                    if not w:
                        break
                    hi = m
        out[name] = {"totals_s": {str(m): {k: v for k, v in t.items() if not k.startswith("n_")}
                                  for m, t in sorted(full.items())},
                     "qmm_wins": {str(m): w for m, w in wins}, "qmm_rows": [lo, hi] if lo is not None else None}
    return out


def table(res: dict[str, Any]) -> list[str]:
    """Summary lines: per format and M, the four shapes' total time of each kernel (microseconds) and ratios."""
    lines: list[str] = []
    for name, s in res.get("qmm_suggest", {}).items():
        lines.append(f"qmm {name}: 8B linears (qkv+o+gate_up+down) total us per M: qmm / bf16 / dequant+cuBLAS"
                     " / tinygemm g64 [/ qgemv]")
        for m, t in s["totals_s"].items():
            cells = [f"{1e6 * t[k]:.1f}" if t.get(k) else "-" for k in
                     ("qmm_s", "bf16_s", "dequant_cublas_s", "tinygemm_g64_s")]
            if m == "1":
                cells.append(f"{1e6 * t['qgemv_s']:.1f}" if t.get("qgemv_s") else "-")
            lines.append(f"  M={m:>4}: " + " / ".join(cells))
        lines.append(f"  suggested QMM_ROWS[{name}] = {s['qmm_rows']}")
        fused = [r for r in res.get("qmm", []) if r["format"] == name and r.get("qmm_gate_up_silu_s")
                 and r.get("qmm_then_silu_s")]
        if fused:
            lines.append("  gate_up us, fused silu / qmm + silu_mul: " + ", ".join(
                f"M={r['m']} {1e6 * r['qmm_gate_up_silu_s']:.1f} / {1e6 * r['qmm_then_silu_s']:.1f}" for r in fused))
    best = [r for r in res.get("qmm_sweep", []) if "best" in r]
    if best:
        lines.append("qmm sweep: fastest launch (block_m x block_n x block_k, split, warps, stages) per shape and M: "
                     + "; ".join(f"{r['format']}/{r['proj']}/M{r['m']} {r['best']['block_m']}x{r['best']['block_n']}"
                                 f"x{r['best']['block_k']} s{r['best']['split_k']} w{r['best']['num_warps']}"
                                 f" st{r['best']['num_stages']} {1e6 * r['seconds']:.1f}us" for r in best))
    return lines


def ptxas_report(names: list[str], k: int = 4096) -> None:
    """Compile the kernel for sm_90 without a GPU (triton.compile + ptxas from the triton wheel) and print per
    format and default launch shape (M = 16, N = 4096, bias and residual on): registers, spills, whether the
    dot became wgmma, and the SASS instructions of the main loop per weight. Runs on any machine with triton."""
    import inspect
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from quant_kernels import FORMATS
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from chatcore.layers import triton_qmm
    from chatcore.layers.triton_qgemv import format_constants, row_mode, tile_k

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next((os.path.join(bindir, p) for p in ("ptxas-blackwell", "ptxas")
                  if os.path.exists(os.path.join(bindir, p))), "ptxas")
    names_ = list(inspect.signature(triton_qmm._qmm.fn).parameters)
    ints = ("M", "N", "K", "K_SPLIT")
    for name in names:
        fmt = FORMATS[name](k)
        cfg = mm_config(16, 4096, k, fmt)
        words = (fmt.bits < 8 and not row_mode(fmt, k)) or (fmt.bits == 8 and not fmt.float_codes)
        ptr = {"x_ptr": "*bf16", "out_ptr": "*bf16", "b_ptr": "*bf16", "res_ptr": "*bf16", "part_ptr": "*fp32",
               "cnt_ptr": "*i32", "ql_ptr": "*i32" if words and fmt.bits < 8 else "*u8", "qh_ptr": "*i32",
               "q_ptr": "*fp8e4nv" if fmt.float_codes else ("*i32" if words else "*u8"),
               "d_ptr": "*fp32" if row_mode(fmt, k) else "*fp16", "sc_ptr": "*i8" if fmt.bits == 6 else "*u8",
               "m_ptr": "*fp16", "dmin_ptr": "*fp16", "mn_ptr": "*u8"}
        sig = {n: ptr.get(n, "constexpr" if n.isupper() and n not in ints else "i32") for n in names_}
        aligned = {(names_.index(n),): [["tt.divisibility", 16]] for n in names_
                   if n.endswith("_ptr") or n.startswith("s_") or n in ("N", "K", "K_SPLIT")}
        bk = tile_k(fmt, k, cfg.block_k)
        gs = (bk if row_mode(fmt, k) else fmt.group) if fmt.bits == 8 else 32
        consts = dict(format_constants(fmt, k), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk, NG=bk // gs,
                      GS=gs, SPLIT=cfg.split_k, WORDS=words, HAS_BIAS=True, RESIDUAL=True, GATE_UP=0,
                      DOT_F32=False)
        compiled = triton.compile(ASTSource(triton_qmm._qmm, sig, consts, aligned), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        with tempfile.TemporaryDirectory() as tmp:
            src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
            with open(src, "w") as f:
                f.write(compiled.asm["ptx"])
            log = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", cubin], capture_output=True, text=True).stderr
            sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", cubin], capture_output=True,
                                  text=True).stdout
        ins = [(int(m.group(1), 16), m.group(2)) for line in sass.splitlines()
               if (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line))]
        at = {a: i for i, (a, _) in enumerate(ins)}
        loop = 0
        for i, (a, t) in enumerate(ins):   # the longest backward branch: the K loop
            hit = re.search(r"0x([0-9a-f]+)", t) if "BRA" in t else None
            if hit and int(hit.group(1), 16) < a and int(hit.group(1), 16) in at:
                loop = max(loop, i - at[int(hit.group(1), 16)] + 1)
        regs = re.search(r"Used (\d+) registers", log)
        spill = re.search(r"(\d+) bytes spill stores", log)
        per = loop / (cfg.block_n * bk / (32 * cfg.num_warps))
        print(f"{name:<10} {cfg.block_m}x{cfg.block_n}x{bk} split {cfg.split_k} warps {cfg.num_warps}: "
              f"{regs.group(1) if regs else '?'} registers, {spill.group(1) if spill else '?'} bytes spilled, "
              f"{'wgmma' if 'HGMMA' in sass else 'mma.sync' if 'HMMA' in sass else 'no mma'}, "
              f"loop {loop} instructions = {per:.2f} per weight", flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="qmm offline checks (the GPU part runs from quant_kernels.py --parts qmm)")
    ap.add_argument("--ptxas", nargs="*", metavar="FORMAT", help="compile for sm_90 and report per format")
    args = ap.parse_args()
    from quant_kernels import FORMATS as _F

    ptxas_report(args.ptxas or sorted(_F))
