"""The fused dequant-GEMM (chatcore.layers.triton_qmm) against dequantize-then-matmul for every format of the
planar layout, its launch options (tiles, split-K), epilogues, and the kernel choice of the packed linear.

Without a GPU the kernel runs under Triton's CPU interpreter (tests/conftest.py) at small shapes; the `gpu` tests
run the compiled kernel at the 8B model's shapes and inside a CUDA graph.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from quant_factory import FORMATS as REAL_FORMATS
from quant_factory import quantize
from test_quant_kernels import FORMATS, random_packed, silu_mul

from chatcore.layers import qmm_choice
from chatcore.layers.qmm_choice import packed_kernel
from chatcore.layers.triton_qmm import MMConfig, mm_config, qmm, qmm_gate_up_silu, rows_tile
from chatcore.quant.packed import PackedWeight, QuantFormat, dequantize

pytest.importorskip("triton")

# relative error bound (of the largest output) per activation dtype: float32 accumulation; float16: two
# roundings of the output (product, residual sum) and the weights' rounding; bfloat16 likewise, where the
# interpreter truncates (the GPU rounds): up to an ulp (2**-7) per rounding
TOL = {torch.float32: 2e-5, torch.float16: 2 ** -9, torch.bfloat16: 2 ** -6}


def unfused(x: torch.Tensor, w: PackedWeight, b: torch.Tensor | None = None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + F.linear(x, dequantize(w, x.dtype), b)`` in float64, rounded to x's dtype where the unfused
    path rounds (the product before the residual add)."""
    out = x.double() @ dequantize(w, x.dtype).double().T
    if b is not None:
        out = out + b.double()
    if residual is not None:
        out = out.to(x.dtype).double() + residual.double()
    return out


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float | None = None) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    scale = ref.abs().max().item() if scale is None else scale
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * scale, f"max error {err} of {scale}"


def inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x, b, res = torch.randn(m, k, generator=g), torch.randn(n, generator=g), 4 * torch.randn(m, n, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, b, res))


@pytest.mark.parametrize(("m", "dtype", "fused"), [(1, torch.float16, False), (3, torch.bfloat16, True),
                                                   (17, torch.float32, True), (17, torch.float16, True)],
                         ids=["m1-fp16", "m3-bf16-bias-res", "m17-fp32-bias-res", "m17-fp16-bias-res"])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_qmm_matches_dequantize_then_matmul(name: str, m: int, dtype: torch.dtype, fused: bool) -> None:
    n, k = 40, 512                                 # 40 rows of a 64-row tile: rows past N are clamped
    w = random_packed(name, n, k, seed=len(name) + m)
    x, b, res = inputs(m, n, k, dtype, seed=m)
    kw = {"b": b, "residual": res} if fused else {}
    close(qmm(x, w, **kw), unfused(x, w, **kw), dtype)


@pytest.mark.parametrize(("name", "k", "config"), [
    ("q4_k", 768, MMConfig(block_n=16, block_k=256, split_k=2)),    # 3 steps: split 2 does not divide, 1 runs
    ("q6_k", 512, MMConfig(block_n=32, block_k=32, split_k=4)),     # 32-column steps: two 16-column groups each
    ("int4_g128", 384, MMConfig(block_n=16, block_k=64, split_k=8)),  # step raised to the 128-column group; 3 steps
    ("q5_1", 512, MMConfig(block_m=32, block_n=64, block_k=128, split_k=4)),
    ("q8_0", 256, MMConfig(block_n=16, block_k=64, split_k=2)),
    ("int8", 384, MMConfig(block_n=16, block_k=128, split_k=4)),    # per-row scale after a split sum
    ("fp8", 512, MMConfig(block_m=16, block_n=16, block_k=64, split_k=8)),
])
def test_qmm_launch_shapes(name: str, k: int, config: MMConfig) -> None:
    n, m = 37, 17                                   # N and M not multiples of the tiles: masked
    w = random_packed(name, n, k, seed=3)
    x, b, res = inputs(m, n, k, torch.float32, seed=4)
    out = qmm(x, w, b, residual=res, config=config)
    close(out, unfused(x, w, b, res), torch.float32)
    assert qmm(x, w, b, residual=res, config=config).equal(out)   # split partials summed in a fixed order


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")   # silu of a large negative gate: -0
@pytest.mark.parametrize(("m", "dtype", "config"), [
    (1, torch.float32, None), (3, torch.bfloat16, None),
    (17, torch.float32, MMConfig(block_n=16, block_k=64, split_k=4)),
], ids=["m1-fp32", "m3-bf16", "m17-fp32-split4"])
@pytest.mark.parametrize("name", ["q4_k", "q6_k", "q5_1", "q8_0", "int4_g64", "int8", "fp8"])
def test_gate_up_silu_matches_unfused(name: str, m: int, dtype: torch.dtype, config: MMConfig | None) -> None:
    n, k = 24, 256                                   # [2N, K] = [48, 256]
    w = random_packed(name, 2 * n, k, seed=7 + m)
    x, b, _ = inputs(m, 2 * n, k, dtype, seed=8)
    for bias in (None, b):
        r = unfused(x, w, bias).to(dtype).double()   # each half rounded as the projection's output
        ref, scale = silu_mul(r, n)
        close(qmm_gate_up_silu(x, w, bias, config=config), ref, dtype, scale)


@pytest.mark.parametrize("name", sorted(REAL_FORMATS))
def test_qmm_on_quantized_weights(name: str) -> None:
    """Weights of a real-looking distribution quantized by the test quantizer (scales and offsets as a model's)."""
    g = torch.Generator().manual_seed(5)
    w = quantize(torch.randn(48, 512, generator=g) * 0.02, REAL_FORMATS[name])
    x = torch.randn(5, 512, generator=g).half()
    close(qmm(x, w), unfused(x, w), torch.float16)


def test_qmm_takes_shards_and_strided_rows() -> None:
    """Row and column shards are views of the planes (strided rows), x a column slice of a wider tensor."""
    w = random_packed("q5_k", 64, 1024, seed=9)
    wide = torch.randn(6, 1536)
    x = wide[:, 256:768]
    assert x.stride(0) == 1536
    for part in (w.rows(16, 48).columns(256, 768), w.columns(512, 1024)):
        close(qmm(x, part), unfused(x, part), torch.float32)


@pytest.mark.parametrize("name", ["q4_k", "int4_g64", "q5_k", "q5_0", "q6_k", "q8_0", "int8"])
def test_qmm_reads_unaligned_codes_by_bytes(name: str) -> None:
    """4-6-bit codes (ql) and int8 codes are read as int32 words where their plane lies on 4-byte boundaries,
    else byte by byte: both give the same products."""
    w = random_packed(name, 24, 256, seed=8)
    plane = "q" if w.fmt.bits == 8 else "ql"
    codes = getattr(w, plane)
    wide = torch.zeros(24, codes.shape[1] + 2, dtype=codes.dtype)
    wide[:, 2:] = codes
    odd = dataclasses.replace(w, **{plane: wide[:, 2:]})
    assert getattr(odd, plane).stride(0) % 4 and getattr(odd, plane).equal(codes)
    x = torch.randn(3, 256)
    cfg = MMConfig(block_n=16, block_k=128)
    assert qmm(x, odd, config=cfg).equal(qmm(x, w, config=cfg))
    close(qmm(x, odd, config=cfg), unfused(x, w), torch.float32)


def test_qmm_with_one_4bit_group_per_row() -> None:
    k = 256
    f = QuantFormat("int4_row", 4, k, k, offset="min")
    g = torch.Generator().manual_seed(2)
    w = PackedWeight(f, (20, k), ql=torch.randint(0, 256, (20, k // 2), dtype=torch.uint8, generator=g),
                     d=torch.rand(20, 1, generator=g) * 0.01, m=(torch.randn(20, 1, generator=g) * 0.05).half())
    x, b, res = inputs(5, 20, k, torch.float32, seed=3)
    close(qmm(x, w, b, residual=res, config=MMConfig(block_n=16, block_k=64, split_k=2)), unfused(x, w, b, res),
          torch.float32)


def test_default_config_and_rows_tile() -> None:
    assert [rows_tile(m) for m in (1, 2, 16, 17, 33, 64, 65, 256)] == [16, 16, 16, 32, 64, 64, 128, 128]
    fmt = FORMATS["q4_k"](4096)
    narrow, wide = mm_config(4, 4096, 4096, fmt), mm_config(4, 28672, 4096, fmt)
    assert (narrow.block_n, narrow.split_k, wide.block_n, wide.split_k) == (64, 4, 64, 1)
    assert mm_config(256, 4096, 4096, fmt).block_m == 128


def test_split_k_leaves_its_counters_at_zero() -> None:
    """The tile counters of a split-K launch are kept between calls: each launch must leave them at zero."""
    from chatcore.layers import triton_qmm

    w = random_packed("q4_k", 48, 1024, seed=6)
    x = torch.randn(33, 1024)
    triton_qmm._COUNTERS.clear()
    cfg = MMConfig(block_n=16, block_k=128, split_k=4)
    first = qmm(x, w, config=cfg)
    kept = triton_qmm._COUNTERS[x.device]
    assert kept.numel() >= 3 * 3 and not kept.any()
    assert qmm(x, w, config=cfg).equal(first)
    assert triton_qmm._COUNTERS[x.device] is kept and not kept.any()


def test_bad_calls_say_what_is_wrong() -> None:
    w = random_packed("q4_0", 8, 64)
    with pytest.raises(ValueError, match=r"x \[M, 64\]"):
        qmm(torch.randn(2, 32), w)
    with pytest.raises(ValueError, match="activations"):
        qmm(torch.randn(2, 64).to(torch.int32), w)
    with pytest.raises(ValueError, match="residual"):
        qmm(torch.randn(2, 64), w, residual=torch.randn(2, 4))
    with pytest.raises(ValueError, match="bias"):
        qmm(torch.randn(2, 64), w, torch.randn(4))
    with pytest.raises(ValueError, match="2N"):
        qmm_gate_up_silu(torch.randn(2, 64), random_packed("q4_0", 7, 64))
    with pytest.raises(ValueError, match="power of two"):
        MMConfig(block_n=48)
    with pytest.raises(ValueError, match="at least 16"):
        MMConfig(block_m=8)
    assert qmm(torch.randn(0, 64), w).shape == (0, 8)


def test_packed_kernel_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    q4, q8 = FORMATS["q4_k"](256), FORMATS["q8_0"](256)
    # the measured defaults: 8-bit codes take the GEMM for 2..16 rows, 4-bit codes never
    assert [packed_kernel(m, q8) for m in (1, 2, 16, 17)] == ["qgemv", "qmm", "qmm", "dense"]
    assert [packed_kernel(m, q4) for m in (1, 2, 16)] == ["qgemv", "dense", "dense"]
    monkeypatch.setitem(qmm_choice.QMM_ROWS, 4, (2, 256))
    assert [packed_kernel(m, q4) for m in (1, 2, 64, 256, 257, 4096)] == ["qgemv", "qmm", "qmm", "qmm", "dense",
                                                                          "dense"]
    monkeypatch.setitem(qmm_choice.QMM_ROWS, 8, (1, 32))   # the GEMM for one row too, and only up to 32
    assert [packed_kernel(m, q8) for m in (1, 32, 33)] == ["qmm", "qmm", "dense"]
    monkeypatch.setitem(qmm_choice.QMM_ROWS, 4, (2, 1))    # an empty range: the older paths
    assert [packed_kernel(m, q4) for m in (1, 2, 64)] == ["qgemv", "dense", "dense"]


@pytest.mark.usefixtures("one_thread")
def test_a_packed_model_through_qmm_matches_its_dequantized_model(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """The packed linear's GEMM route end to end, on the CPU: a small Llama with Q4_K weights (V as Q6_K: one
    fused qkv of mixed formats, run part by part) and biases, whose prompt chunks of 16 rows take qmm and the
    gate/up qmm_gate_up_silu under the interpreter (``use_fused`` forced on for the packed linear and the
    activation), against the model on the dequantized weights."""
    import model_factory
    from family_check import prompt
    from quant_factory import every_matrix, opened_packed

    from chatcore.checkpoint import LoadOptions, load_engine
    from chatcore.layers import activation as activation_module
    from chatcore.layers import linear as linear_module
    from chatcore.layers import triton_qmm

    path = model_factory.randomize_biases(model_factory.make_llama_dir(
        tmp_path / "m", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, attention_bias=True))
    plan = every_matrix("q4_k", v_proj="q6_k")
    engines = {dense: load_engine(path, opened_packed(path, plan, dense=dense), torch.device("cpu"), torch.float32,
                                  LoadOptions(prefill_chunk=16)) for dense in (False, True)}
    calls: list[tuple[int, str]] = []
    real_qmm = triton_qmm.qmm

    def counted(x: torch.Tensor, w: PackedWeight, *args: object, **kw: object) -> torch.Tensor:
        calls.append((x.shape[0], w.fmt.name))
        return real_qmm(x, w, *args, **kw)

    def counted_gate_up(x: torch.Tensor, w: PackedWeight, *args: object, **kw: object) -> torch.Tensor:
        calls.append((x.shape[0], "gate_up " + w.fmt.name))
        return real_gate_up(x, w, *args, **kw)

    real_gate_up = triton_qmm.qmm_gate_up_silu
    monkeypatch.setattr(triton_qmm, "qmm", counted)
    monkeypatch.setattr(triton_qmm, "qmm_gate_up_silu", counted_gate_up)
    monkeypatch.setattr(linear_module, "use_fused", lambda x: True)
    monkeypatch.setattr(activation_module, "use_fused", lambda x: True)
    for bits in (4, 6):                                   # the GEMM for these codes too (off by default)
        monkeypatch.setitem(qmm_choice.QMM_ROWS, bits, (2, 256))
    ids = prompt(24, seed=2)
    got = engines[False].logits(ids)
    monkeypatch.undo()
    assert {m for m, _ in calls} == {16, 8} and {f for _, f in calls} == {"q4_k", "q6_k", "gate_up q4_k"}
    torch.testing.assert_close(got, engines[True].logits(ids), rtol=1e-4, atol=1e-4)


# -- on the GPU: the compiled kernel at the 8B shapes, through linear, and inside a CUDA graph -------------------
GPU_SHAPES = [(6144, 4096), (4096, 4096), (4096, 14336)]
GPU_CONFIGS = [MMConfig(16, 64, 256, 1, 4, 3), MMConfig(16, 128, 128, 4, 4, 4), MMConfig(32, 32, 512, 2, 2, 3),
               MMConfig(64, 64, 64, 1, 4, 2), MMConfig(16, 16, 1024, 8, 1, 3), MMConfig(16, 256, 64, 1, 8, 3)]
GPU_FORMATS = ["q4_k", "q5_k", "q6_k", "q4_0", "q8_0", "int4_g64", "int4_g128", "int8", "fp8"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_FORMATS)
def test_gpu_qmm_model_shapes(name: str) -> None:
    for n, k in GPU_SHAPES:
        w = random_packed(name, n, k, seed=n + k, device="cuda")
        for m in (1, 2, 8, 33, 256):
            x, b, res = inputs(m, n, k, torch.bfloat16, seed=m, device="cuda")
            close(qmm(x, w), unfused(x, w), torch.bfloat16)
            close(qmm(x, w, b, residual=res), unfused(x, w, b, res), torch.bfloat16)
        x16, b16, res16 = inputs(8, n, k, torch.float16, seed=1, device="cuda")
        close(qmm(x16, w, b16, residual=res16), unfused(x16, w, b16, res16), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["q4_k", "q6_k", "q8_0", "int4_g64", "int8", "fp8"])
def test_gpu_gate_up_silu_at_the_8b_shape(name: str) -> None:
    n, k = 14336, 4096
    w = random_packed(name, 2 * n, k, seed=5, device="cuda")
    for m in (2, 16, 64):
        x, b, _ = inputs(m, 2 * n, k, torch.bfloat16, seed=m, device="cuda")
        ref, scale = silu_mul(unfused(x, w, b).to(torch.bfloat16).double(), n)
        close(qmm_gate_up_silu(x, w, b), ref, torch.bfloat16, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["q4_k", "q6_k", "q8_0", "int4_g128", "fp8"])
def test_gpu_qmm_launch_shapes_agree(name: str) -> None:
    """Tile shapes, warps, stages and splits the benchmark's sweep tries compile and agree."""
    n, k = 4096, 4096
    w = random_packed(name, n, k, seed=2, device="cuda")
    x, _, _ = inputs(16, n, k, torch.bfloat16, seed=3, device="cuda")
    want = unfused(x, w)
    for cfg in GPU_CONFIGS:
        close(qmm(x, w, config=cfg), want, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_linear_takes_qmm_for_a_few_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatcore.layers.linear import linear

    monkeypatch.setitem(qmm_choice.QMM_ROWS, 4, (2, 16))   # on for this test (the measured default is off)
    w = random_packed("q4_k", 1024, 4096, seed=4, device="cuda")
    x, b, res = inputs(6, 1024, 4096, torch.bfloat16, seed=5, device="cuda")
    nw = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    got = linear(x.view(2, 3, 4096), w, b, norm=(nw, 1e-5), residual=res.view(2, 3, 1024))
    h = torch.nn.functional.rms_norm(x, (4096,), nw, 1e-5)
    assert got.view(6, 1024).equal(qmm(h, w, b, residual=res))
    monkeypatch.setitem(qmm_choice.QMM_ROWS, 4, (2, 1))   # the older path: dequantize + cuBLAS
    old = linear(x, w, b, norm=(nw, 1e-5), residual=res)
    close(old, unfused(h, w, b, res), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["q4_k", "int4_g64", "fp8"])
def test_gpu_qmm_replays_in_a_cuda_graph(name: str) -> None:
    n, k = 4096, 4096
    w = random_packed(name, n, k, seed=1, device="cuda")
    x, b, res = inputs(8, n, k, torch.bfloat16, seed=3, device="cuda")
    static_x = x.clone()

    def step() -> tuple[torch.Tensor, torch.Tensor]:   # split-K (the default at 8 rows x 4096) and one pass
        return qmm(static_x, w, b, residual=res), qmm(static_x, w, config=MMConfig(split_k=1))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (10, 11):
        static_x.copy_(inputs(8, n, k, torch.bfloat16, seed=seed, device="cuda")[0])
        graph.replay()
        want = step()
        assert outs[0].equal(want[0]) and outs[1].equal(want[1])
