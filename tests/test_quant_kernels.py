"""The packed-weight kernels (chatcore.layers.triton_qgemv, triton_dequant) against the reference dequantization
(chatcore.quant.packed.dequantize) for every format of the planar layout.

Weights are random planes (random codes and finite scales), so nothing here depends on a quantizer. Without a GPU
the kernels run under Triton's CPU interpreter (tests/conftest.py), at small shapes; the `gpu` tests run the
compiled kernels at the model shapes and inside a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatcore.layers.triton_dequant import dequantize_to
from chatcore.layers.triton_qgemv import QConfig, qgemv, qgemv_gate_up_silu
from chatcore.quant.packed import PackedWeight, QuantFormat, dequantize

pytest.importorskip("triton")

FORMATS = {  # name -> format factory taking K (per-row formats have one group per row)
    "q4_0": lambda k: QuantFormat("q4_0", 4, 32, 32, zero=8),
    "q4_1": lambda k: QuantFormat("q4_1", 4, 32, 32, offset="min"),
    "q5_0": lambda k: QuantFormat("q5_0", 5, 32, 32, zero=16),
    "q5_1": lambda k: QuantFormat("q5_1", 5, 32, 32, offset="min"),
    "q8_0": lambda k: QuantFormat("q8_0", 8, 32, 32),
    "q4_k": lambda k: QuantFormat("q4_k", 4, 32, 256, sub_scale=True, offset="dmin"),
    "q5_k": lambda k: QuantFormat("q5_k", 5, 32, 256, sub_scale=True, offset="dmin"),
    "q6_k": lambda k: QuantFormat("q6_k", 6, 16, 256, zero=32, sub_scale=True),
    "int4_g32": lambda k: QuantFormat("int4_g32", 4, 32, 32, offset="min"),
    "int4_g64": lambda k: QuantFormat("int4_g64", 4, 64, 64, offset="min"),
    "int4_g128": lambda k: QuantFormat("int4_g128", 4, 128, 128, zero=8, offset="min"),
    "int8": lambda k: QuantFormat("int8", 8, k, k),
    "fp8": lambda k: QuantFormat("fp8", 8, k, k, float_codes=True),
}


def random_packed(name: str, n: int, k: int, seed: int = 0, device: str = "cpu") -> PackedWeight:
    """A [n, k] weight of format ``name`` from random planes: any codes, scales small and finite."""
    f = FORMATS[name](k)
    g = torch.Generator().manual_seed(seed)

    def u8(*shape: int, high: int = 256) -> torch.Tensor:
        return torch.randint(0, high, shape, dtype=torch.uint8, generator=g)

    p: dict[str, torch.Tensor] = {}
    if f.bits == 8:
        p["q"] = ((torch.randn(n, k, generator=g) * 3).to(torch.float8_e4m3fn) if f.float_codes
                  else u8(n, k).view(torch.int8))
    else:
        p["ql"] = u8(n, k // 2)
        if f.bits > 4:
            p["qh"] = u8(n, k * (f.bits - 4) // 8)
    scale_dtype = torch.float32 if f.group == k else torch.float16
    p["d"] = (torch.rand(n, k // f.block, generator=g) * 0.02 + 1e-3).to(scale_dtype)
    if f.sub_scale:
        p["sc"] = u8(n, k // f.group).view(torch.int8) if f.bits == 6 else u8(n, k // f.group, high=64)
    if f.offset == "min":
        p["m"] = (torch.randn(n, k // f.group, generator=g) * 0.05).half()
    elif f.offset == "dmin":
        p["dmin"] = (torch.rand(n, k // f.block, generator=g) * 0.01).half()
        p["mn"] = u8(n, k // f.group, high=64)
    return PackedWeight(f, (n, k), **{name: t.to(device) for name, t in p.items()})


def reference(x: torch.Tensor, w: PackedWeight, b: torch.Tensor | None, norm: tuple[torch.Tensor, float] | None,
              residual: torch.Tensor | None) -> torch.Tensor:
    """The unfused decode projection in float64 (rounded to x's dtype where gemv rounds, before a residual)."""
    h = x.double()
    if norm is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm[1]) * norm[0].double()
    out = h @ dequantize(w).double().T
    if b is not None:
        out = out + b.double()
    if residual is not None:
        out = out.to(x.dtype).double() + residual.double()
    return out


def inputs(k: int, n: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x, nw = torch.randn(1, k, generator=g), 1 + 0.1 * torch.randn(k, generator=g)
    b, res = torch.randn(n, generator=g), torch.randn(1, n, generator=g) * 4
    return tuple(t.to(device=device, dtype=dtype) for t in (x, nw, b, res))


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float | None = None) -> None:
    """Within float32 accumulation error (float32), or a few bfloat16 roundings of the largest value (bfloat16:
    the projection and the residual sum each rounded, and the interpreter truncates where the GPU rounds)."""
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 2e-5 if dtype == torch.float32 else 2 ** -6
    scale = ref.abs().max().item() if scale is None else scale
    err = (out.double() - ref).abs().max().item()
    assert err <= tol * scale, f"max error {err} of {scale}"


def silu_mul(r: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """silu(gate) * up from the two halves of ``r``, and the scale its rounding errors follow (the error of
    silu(g) * u grows with |g| |u|)."""
    g, u = r[:, :n], r[:, n:]
    ref = F.silu(g) * u
    return ref, ref.abs().max().item() + 2 * (g.abs() * u.abs()).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "bias-norm-residual"])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_qgemv_matches_dequantize_then_matmul(name: str, fused: bool, dtype: torch.dtype) -> None:
    n, k = 70, 512                                 # 70 rows: the last program's rows past N are clamped
    w = random_packed(name, n, k, seed=len(name))
    x, nw, b, res = inputs(k, n, dtype, seed=1)
    kw = {"norm": (nw, 1e-5), "residual": res} if fused else {}
    out = qgemv(x, w, b if fused else None, **kw)
    close(out, reference(x, w, b if fused else None, kw.get("norm"), kw.get("residual")), dtype)


@pytest.mark.parametrize(("name", "k", "config"), [
    ("q4_k", 768, QConfig(block_n=2, block_k=256)),     # K not a power of two: three 256-column steps
    ("q6_k", 512, QConfig(block_n=8, block_k=32)),      # 32-column steps: two 16-column groups each
    ("int4_g128", 384, QConfig(block_n=1, block_k=64)), # step raised to the 128-column group
    ("q5_0", 96, QConfig(block_n=16, block_k=1024)),    # one 32-column step, wider than the rows
    ("int8", 384, QConfig(block_n=4, block_k=256)),     # per-row scale, 128-column steps
    ("fp8", 160, QConfig(block_n=2, block_k=64)),
])
def test_qgemv_launch_shapes(name: str, k: int, config: QConfig) -> None:
    n = 37
    w = random_packed(name, n, k, seed=3)
    x, nw, b, res = inputs(k, n, torch.float32, seed=4)
    out = qgemv(x, w, b, norm=(nw, 1e-6), residual=res, config=config)
    close(out, reference(x, w, b, (nw, 1e-6), res), torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")   # silu of a large negative gate: -0
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["q4_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "int4_g64", "int8", "fp8"])
def test_gate_up_silu_matches_unfused(name: str, dtype: torch.dtype) -> None:
    n, k = 35, 512                                  # [2N, K] = [70, 512]
    w = random_packed(name, 2 * n, k, seed=7)
    x, nw, b, _ = inputs(k, 2 * n, dtype, seed=8)
    for bias, norm in ((None, None), (b, (nw, 1e-5))):
        r = reference(x, w, bias, norm, None).to(dtype).double()   # each half rounded as the projection's output
        ref, scale = silu_mul(r, n)
        close(qgemv_gate_up_silu(x, w, bias, norm=norm), ref, dtype, scale)


def test_qgemv_takes_shards() -> None:
    """Row and column shards are views of the planes (strided rows): the kernel reads them in place."""
    w = random_packed("q5_k", 64, 1024, seed=9)
    x = torch.randn(1, 512)
    for part in (w.rows(16, 48).columns(256, 768), w.columns(512, 1024)):
        close(qgemv(x, part), reference(x, part, None, None, None), torch.float32)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_dequantize_to_is_bit_exact(name: str) -> None:
    w = random_packed(name, 45, 512, seed=11)
    ref = dequantize(w)
    out = dequantize_to(w, torch.float32)
    assert out.view(torch.int32).equal(ref.view(torch.int32))
    for dtype in (torch.bfloat16, torch.float16):
        assert dequantize_to(w, dtype).view(torch.int16).equal(ref.to(dtype).view(torch.int16)), dtype
    shard = w.rows(5, 30) if w.fmt.group == 512 else w.rows(5, 30).columns(256, 512)
    assert dequantize_to(shard, torch.float32).view(torch.int32).equal(dequantize(shard).view(torch.int32))


def test_bad_calls_say_what_is_wrong() -> None:
    w = random_packed("q4_0", 8, 64)
    with pytest.raises(ValueError, match=r"x \[1, 64\]"):
        qgemv(torch.randn(1, 32), w)
    with pytest.raises(ValueError, match="residual"):
        qgemv(torch.randn(1, 64), w, residual=torch.randn(1, 4))
    with pytest.raises(ValueError, match="2N"):
        qgemv_gate_up_silu(torch.randn(1, 64), random_packed("q4_0", 7, 64))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        dequantize_to(w, torch.int8)
    odd = PackedWeight(QuantFormat("odd", 8, 96, 96), (4, 192), q=torch.zeros(4, 192, dtype=torch.int8),
                       d=torch.ones(4, 2))
    with pytest.raises(ValueError, match="no packed kernel"):
        qgemv(torch.randn(1, 192), odd)
    with pytest.raises(ValueError, match="power of two"):
        QConfig(block_n=3)


# -- on the GPU: the compiled kernels at model shapes, and inside a CUDA graph ----------------------------------
GPU_SHAPES = [(4096, 4096), (1024, 4096), (4096, 14336), (6144, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_gpu_qgemv_model_shapes(name: str) -> None:
    for n, k in GPU_SHAPES:
        w = random_packed(name, n, k, seed=n + k, device="cuda")
        x, nw, b, res = inputs(k, n, torch.bfloat16, seed=2, device="cuda")
        close(qgemv(x, w), reference(x, w, None, None, None), torch.bfloat16)
        close(qgemv(x, w, b, norm=(nw, 1e-5), residual=res), reference(x, w, b, (nw, 1e-5), res), torch.bfloat16)
        x32 = x.float()
        close(qgemv(x32, w), reference(x32, w, None, None, None), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["q4_k", "q6_k", "q8_0", "int4_g128", "int8", "fp8"])
def test_gpu_gate_up_and_dequantize(name: str) -> None:
    n, k = 14336, 4096
    w = random_packed(name, 2 * n, k, seed=5, device="cuda")
    x, nw, _, _ = inputs(k, 2 * n, torch.bfloat16, seed=6, device="cuda")
    r = reference(x, w, None, (nw, 1e-5), None).to(torch.bfloat16).double()
    ref, scale = silu_mul(r, n)
    close(qgemv_gate_up_silu(x, w, norm=(nw, 1e-5)), ref, torch.bfloat16, scale)
    ref = dequantize(w)
    assert dequantize_to(w, torch.float32).view(torch.int32).equal(ref.view(torch.int32))
    assert dequantize_to(w, torch.bfloat16).view(torch.int16).equal(ref.bfloat16().view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["q4_k", "q6_k", "int4_g64", "int8", "fp8"])
def test_gpu_qgemv_replays_in_a_cuda_graph(name: str) -> None:
    n, k = 4096, 4096
    w = random_packed(name, n, k, seed=1, device="cuda")
    gu = random_packed(name, 2 * 1024, k, seed=2, device="cuda")
    x, nw, b, res = inputs(k, n, torch.bfloat16, seed=3, device="cuda")
    static_x = x.clone()

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        return (qgemv(static_x, w, b, norm=(nw, 1e-5), residual=res),
                qgemv_gate_up_silu(static_x, gu, norm=(nw, 1e-5)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (10, 11):
        static_x.copy_(inputs(k, n, torch.bfloat16, seed=seed, device="cuda")[0])
        graph.replay()
        want = step()
        assert outs[0].equal(want[0]) and outs[1].equal(want[1])
