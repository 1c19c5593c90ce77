"""Batch-1 decode projections on the CPU: float32 ``F.linear`` against every quantized-weight route the
installed torch offers, for the demo model's and a 1B model's shapes.

Usage: python bench/cpu_quant.py [--out bench/cpu_quant.json] [--models 135m,1b] [--routes all|a,b,...]
       [--repeats 5]

One "token" is what a decode step multiplies: per layer the fused q/k/v [q + 2 kv, hidden], o [hidden, q],
fused gate/up [2 mlp, hidden] and down [hidden, mlp] projections, then the head [vocab, hidden], each a
distinct weight (so nothing stays in cache between layers, as in a real step), at batch 1. A route is timed as
the median over ``--repeats`` of whole tokens, after two warm-up tokens (and its compilation, reported apart).
Each route's output is checked against ``F.linear`` with its own dequantized weights (``err``: max relative
error of a row), so a fast route that computes something else shows.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from cpu_decode import copy_bandwidth  # bench/ is the script's own folder on sys.path

SHAPES = {
    "135m": {"name": "SmolLM2-135M", "layers": 30, "hidden": 576, "q": 576, "kv": 192, "mlp": 1536,
             "vocab": 49152},
    "1b": {"name": "Llama-3.2-1B", "layers": 16, "hidden": 2048, "q": 2048, "kv": 512, "mlp": 8192,
           "vocab": 128256},
}

Op = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Route:
    """A way to multiply x [1, K] by a weight: ``prepare(w float32 [N, K])`` -> (op, bytes the op's weight
    holds, the float32 weight the op really multiplies by)."""

    name: str
    note: str
    prepare: Callable[[torch.Tensor], tuple[Op, int, torch.Tensor]]


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# -- int8 per-output-channel and int4 group-wise quantization (symmetric int8; int4 with a zero point) --------
def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), s


def int4_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes 0..15 [N, K] (uint8), scale and min [N, K/group]: w ~ code * scale + min."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15).clamp(min=1e-8)
    code = torch.round((g - lo[..., None]) / s[..., None]).clamp(0, 15).to(torch.uint8)
    return code.reshape(n, k), s, lo


def pack_nibbles(code: torch.Tensor) -> torch.Tensor:
    """[N, K] codes -> [N, K/2] bytes: per 32 columns, byte j = column j | column j + 16 << 4 (Q4_0's order)."""
    n, k = code.shape
    c = code.reshape(n, k // 32, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2)


# -- the routes ---------------------------------------------------------------------------------------------
def r_f32(w: torch.Tensor) -> tuple[Op, int, torch.Tensor]:
    wl = w.t().contiguous().t() if w.shape[0] >= w.shape[1] else w.contiguous()   # chatcore's for_linear
    return (lambda x: F.linear(x, wl)), nbytes(wl), w


def r_f32_mkl_packed(w: torch.Tensor) -> tuple[Op, int, torch.Tensor]:
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 1)
    return (lambda x: torch.ops.mkl._mkl_linear(x, packed, w, None, 1)), nbytes(w), w


def r_bf16(w: torch.Tensor) -> tuple[Op, int, torch.Tensor]:
    wb = w.to(torch.bfloat16)
    wl = wb.t().contiguous().t() if w.shape[0] >= w.shape[1] else wb
    return (lambda x: F.linear(x.to(torch.bfloat16), wl)), nbytes(wb), wb.float()


def r_bf16_onednn(w: torch.Tensor) -> tuple[Op, int, torch.Tensor]:
    wb = w.to(torch.bfloat16)
    packed = torch.ops.mkldnn._reorder_linear_weight(wb, 1)
    return (lambda x: torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, None, "none", [], "")), \
        nbytes(wb), wb.float()


def r_fp16_onednn(w: torch.Tensor) -> tuple[Op, int, torch.Tensor]:
    packed = torch.ops.onednn.linear_prepack_fp16(w.to(torch.float16), [1, w.shape[1]])
    return (lambda x: torch.ops.onednn.linear_dynamic_fp16(x, packed, None)), nbytes(w.half()), w.half().float()


def r_int8_fbgemm_dynamic(w: torch.Tensor) -> tuple[Op, int, torch.Tensor]:
    q, s = int8_rows(w)
    qw = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros_like(s, dtype=torch.long), 0)
    packed = torch.ops.quantized.linear_prepack(qw, None)
    return (lambda x: torch.ops.quantized.linear_dynamic(x, packed, False)), nbytes(q, s), q.float() * s[:, None]


def r_int8_onednn_qlinear(w: torch.Tensor) -> tuple[Op, int, torch.Tensor]:
    """oneDNN int8 x int8 (VNNI / AMX) with the activation quantized per call (per tensor, asymmetric uint8)."""
    q, s = int8_rows(w)
    packed = torch.ops.onednn.qlinear_prepack(q, [1, w.shape[1]])
    zp = torch.zeros(w.shape[0], dtype=torch.long)

    def op(x: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.aminmax(x)
        xs = float((hi - lo).clamp(min=1e-8)) / 255
        xz = int(round(-float(lo) / xs))
        qx = torch.clamp(torch.round(x / xs) + xz, 0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(qx, xs, xz, packed, s, zp, None, 1.0, 0, torch.float32,
                                                  "none", [], "")

    return op, nbytes(q, s), q.float() * s[:, None]


def r_int_mm(w: torch.Tensor) -> tuple[Op, int, torch.Tensor]:
    """``torch._int_mm`` (int8 x int8 -> int32) with the activation quantized per call (symmetric)."""
    q, s = int8_rows(w)
    qt = q.t().contiguous()

    def op(x: torch.Tensor) -> torch.Tensor:
        xs = x.abs().amax().clamp(min=1e-8) / 127
        qx = torch.round(x / xs).to(torch.int8)
        return torch._int_mm(qx, qt).float() * (s * xs)

    return op, nbytes(q, s), q.float() * s[:, None]


def r_int8pack_stock(w: torch.Tensor) -> tuple[Op, int, torch.Tensor]:
    q, s = int8_rows(w)
    return (lambda x: torch.ops.aten._weight_int8pack_mm(x, q, s)), nbytes(q, s), q.float() * s[:, None]


def r_int4pack_stock(w: torch.Tensor) -> tuple[Op, int, torch.Tensor]:
    code, s, lo = int4_groups(w, 32)
    # tinygemm's form: w = (code - 8) * scale + zero, with zero = min + 8 * scale
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(code.to(torch.int32), 1)
    sz = torch.stack([s, lo + 8 * s], dim=-1).transpose(0, 1).contiguous()
    ref = (code.float().reshape(*s.shape, 32) * s[..., None] + lo[..., None]).reshape(w.shape)
    return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)), nbytes(packed, s, lo), ref


def _compiled(fn: Callable, mode: str | None, cpp_wrapper: bool = False) -> Callable:
    opts = {"cpp_wrapper": True} if cpp_wrapper else None
    if mode is not None and opts is None:
        return torch.compile(fn, dynamic=False, mode=mode)
    return torch.compile(fn, dynamic=False, options=(opts or {}) | ({"max_autotune": True} if mode else {}))


def int8_dot(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x * q.to(x.dtype)).sum(-1, dtype=torch.float32) * s          # x [1, K] . q [N, K] -> [N]


def int8_mm(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.mm(x, q.to(x.dtype).t()) * s                             # the pattern Inductor's WOQ pass knows


def int4_dot(x: torch.Tensor, ql: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [1, K], ql [N, K/2] (Q4_0 nibble order), scale and min [N, K/32]: sum_g s * (code . x_g) + m * sum x_g."""
    n = ql.shape[0]
    xg = x.reshape(1, -1, 2, 16)                                            # [1, G, 2, 16]
    b = ql.reshape(n, -1, 16)
    lo = (b & 15).to(torch.float32)
    hi = (b >> 4).to(torch.float32)
    dot = (lo * xg[:, :, 0] + hi * xg[:, :, 1]).sum(-1)                    # [N, G]
    return (dot * s + m * xg.sum((-1, -2))).sum(-1)


def make_compiled(kind: str, mode: str | None = None, cpp_wrapper: bool = False, act: torch.dtype = torch.float32
                  ) -> Callable[[torch.Tensor], tuple[Op, int, torch.Tensor]]:
    compiled: list[Callable] = []

    def prepare(w: torch.Tensor) -> tuple[Op, int, torch.Tensor]:
        if not compiled:
            body = int4_dot if kind == "int4" else int8_dot if kind == "int8_dot" else int8_mm
            compiled.append(_compiled(body, mode, cpp_wrapper))
        fn = compiled[0]
        if kind == "int4":
            code, s, lo = int4_groups(w, 32)
            ql = pack_nibbles(code)
            ref = (code.float().reshape(*s.shape, 32) * s[..., None] + lo[..., None]).reshape(w.shape)
            return (lambda x: fn(x, ql, s, lo)), nbytes(ql, s, lo), ref
        q, s = int8_rows(w)
        if act == torch.float32:
            return (lambda x: fn(x, q, s)), nbytes(q, s), q.float() * s[:, None]
        return (lambda x: fn(x.to(act), q, s)), nbytes(q, s), q.float() * s[:, None]

    return prepare


ROUTES = [
    Route("f32", "float32 F.linear, chatcore's layout (baseline)", r_f32),
    Route("f32_mkl_packed", "float32, MKL packed weight (torch.ops.mkl._mkl_linear)", r_f32_mkl_packed),
    Route("bf16", "bf16 weight and activation, F.linear", r_bf16),
    Route("bf16_onednn", "bf16, oneDNN packed weight (mkldnn._linear_pointwise, AMX)", r_bf16_onednn),
    Route("fp16_onednn", "fp16 weight, oneDNN linear_dynamic_fp16", r_fp16_onednn),
    Route("int8_fbgemm", "int8 per-channel, quantized::linear_dynamic (fbgemm/x86, activation int8 per call)",
          r_int8_fbgemm_dynamic),
    Route("int8_onednn", "int8 x uint8 oneDNN qlinear_pointwise (VNNI/AMX), activation quantized per call",
          r_int8_onednn_qlinear),
    Route("int8_int_mm", "int8 x int8 torch._int_mm, activation quantized per call", r_int_mm),
    Route("int8pack_stock", "aten._weight_int8pack_mm", r_int8pack_stock),
    Route("int4pack_stock", "aten._weight_int4pack_mm_for_cpu, group 32", r_int4pack_stock),
    Route("int8_inductor_dot", "torch.compile of an int8 dequant-dot reduction", make_compiled("int8_dot")),
    Route("int8_inductor_dot_cppwrap", "the same, cpp_wrapper=True", make_compiled("int8_dot", cpp_wrapper=True)),
    Route("int8_inductor_dot_bf16", "the same with a bf16 activation", make_compiled("int8_dot",
                                                                                     act=torch.bfloat16)),
    Route("int8_inductor_mm_autotune", "torch.compile of mm(x, q.float().t()) * s, max-autotune-no-cudagraphs",
          make_compiled("int8_mm", mode="max-autotune-no-cudagraphs")),
    Route("int8_inductor_mm_bf16_autotune", "the same, bf16 activation (Inductor's WOQ int8 template)",
          make_compiled("int8_mm", mode="max-autotune-no-cudagraphs", act=torch.bfloat16)),
    Route("int4_inductor_dot", "torch.compile of a Q4_0-order int4 dequant-dot, group 32",
          make_compiled("int4")),
]


def layer_shapes(c: dict) -> list[tuple[str, int, int]]:
    h = c["hidden"]
    return [("qkv", c["q"] + 2 * c["kv"], h), ("o", h, c["q"]), ("gate_up", 2 * c["mlp"], h), ("down", h, c["mlp"])]


def bench_route(route: Route, c: dict, repeats: int, gen: torch.Generator) -> dict:
    shapes = layer_shapes(c)
    ops: list[tuple[Op, torch.Tensor]] = []
    weight_bytes = 0
    errs = []
    t0 = time.perf_counter()
    first_done = set()
    per_shape = []
    for layer in range(c["layers"] + 1):
        for name, n, k in shapes if layer < c["layers"] else [("head", c["vocab"], c["hidden"])]:
            w = torch.randn(n, k, generator=gen) * k ** -0.5
            op, nb, ref = route.prepare(w)
            x = torch.randn(1, k, generator=gen)
            if name not in first_done:   # compile (if it does) and check the result once per shape
                first_done.add(name)
                y = op(x).reshape(1, n)
                want = F.linear(x, ref)
                errs.append(float(((y - want).abs().amax() / want.abs().amax()).item()))
                per_shape.append((name, n, k))
            weight_bytes += nb
            ops.append((op, x))
            del w, ref
    setup = time.perf_counter() - t0

    def token() -> None:
        for op, x in ops:
            op(x)

    for _ in range(2):
        token()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        token()
        times.append(time.perf_counter() - t)
    ms = statistics.median(times) * 1e3
    return {"ms_per_token": ms, "weight_bytes": weight_bytes, "GBps": weight_bytes / ms / 1e6,
            "max_rel_err": max(errs), "setup_s": setup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("cpu_quant.json")))
    ap.add_argument("--models", default="135m,1b")
    ap.add_argument("--routes", default="all")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    routes = ROUTES if args.routes == "all" else [r for r in ROUTES if r.name in args.routes.split(",")]
    out = Path(args.out)
    result: dict = json.loads(out.read_text()) if out.exists() else {}
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                         "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
                         "copy_bandwidth_GBps": copy_bandwidth() / 1e9}
    result.setdefault("routes", {})
    result["notes"] = {r.name: r.note for r in ROUTES}
    for model in args.models.split(","):
        c = SHAPES[model]
        res = result["routes"].setdefault(model, {})
        for route in routes:
            gen = torch.Generator().manual_seed(0)
            torch._dynamo.reset()
            try:
                res[route.name] = bench_route(route, c, args.repeats, gen)
            except Exception as e:   # noqa: BLE001 - a route this torch build lacks is a result too
                res[route.name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            r = res[route.name]
            print(model, route.name, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()},
                  flush=True)
        base = res.get("f32", {}).get("ms_per_token")
        for r in res.values():
            if base and "ms_per_token" in r:
                r["speedup_vs_f32"] = base / r["ms_per_token"]
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print_table(result)


def print_table(result: dict) -> None:
    print(f"\n{'model':<6} {'route':<32} {'ms/token':>9} {'GB/s':>6} {'MB':>7} {'vs f32':>7} {'rel err':>8}")
    for model, res in result["routes"].items():
        for name, r in res.items():
            if "error" in r:
                print(f"{model:<6} {name:<32} {'-':>9} {'':>6} {'':>7} {'':>7}  {r['error'][:60]}")
                continue
            print(f"{model:<6} {name:<32} {r['ms_per_token']:>9.2f} {r['GBps']:>6.1f} "
                  f"{r['weight_bytes'] / 1e6:>7.0f} {r.get('speedup_vs_f32', float('nan')):>7.2f} "
                  f"{r['max_rel_err']:>8.1e}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["routes"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        res = {k: v for k, v in result["routes"][model].items() if "ms_per_token" in v}
        names = list(res)
        ax.barh(names, [res[n]["ms_per_token"] for n in names],
                color=["k" if n == "f32" else "tab:blue" for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("ms per token (all projections, batch 1)")
        ax.set_title(f"{SHAPES[model]['name']} shapes, {result['machine']['threads']} threads", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
