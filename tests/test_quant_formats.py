"""Packed weights (#15): GGUF rows repacked into the planar layout dequantize to ``gguf.quants.dequantize`` bit for
bit; the layout's row / column operations agree with slicing the dequantized matrix; the ``quantize=`` modes keep
their documented error bounds; and the load path serves packed weights where the options say so."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf_convert import write_gguf
from model_factory import make_llama_dir

from chatcore import checkpoint
from chatcore.checkpoint import LoadOptions, open_checkpoint, serve_source
from chatcore.cli import _parser
from chatcore.errors import LoadOptionError
from chatcore.quant.gguf_pack import FORMATS, PACKABLE, pack_gguf, packed_size
from chatcore.quant.names import quantized_names
from chatcore.quant.packed import PackedWeight, cat_rows, dequantize
from chatcore.quant.quantize import check_device, fit_group, quantize, quantized_nbytes

# byte offsets of each type's float16 fields (d, m / dmin) inside a block
F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q4_K: (0, 2),
              Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
TYPES = sorted(PACKABLE, key=lambda t: t.value)
QUANTIZABLE = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]   # the types gguf.quants.quantize writes


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal float32 bit patterns (so +0 and -0 differ, and so would any rounding)."""
    return a.dtype == b.dtype == torch.float32 and bool((a.view(torch.int32) == b.view(torch.int32)).all())


def random_blocks(qtype: Q, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random GGUF rows [n, bytes] whose float16 fields are finite values: normal, tiny, subnormal, +-0."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        vals = (rng.standard_normal((n, k // block)) * rng.choice([1e-3, 0.02, 1.0], (n, k // block)))
        vals = vals.astype(np.float16)
        vals.flat[:4] = np.array([0.0, -0.0, 6e-8, -3e-5], np.float16)[: vals.size]
        raw[:, :, at : at + 2] = vals.view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


def theirs(raw: np.ndarray, qtype: Q) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw, qtype), dtype=np.float32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(3, 256), (7, 768)])
def test_random_blocks_dequantize_as_gguf_does(qtype: Q, shape: tuple[int, int]) -> None:
    raw = random_blocks(qtype, *shape, np.random.default_rng(qtype.value))
    w = pack_gguf(torch.from_numpy(raw.copy()), qtype, shape)
    assert w.fmt is FORMATS[qtype] and w.fmt.name == qtype.name.lower()
    assert same_bits(dequantize(w), theirs(raw, qtype))
    assert w.nbytes() == packed_size(qtype, shape)
    assert w.nbytes() * 8 == w.fmt.bits_per_weight * shape[0] * shape[1]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_tensors_dequantize_as_gguf_does(qtype: Q) -> None:
    data = np.random.default_rng(1).standard_normal((16, 512)).astype(np.float32)
    data[3] = 0.0                                            # an all-zero row: d = 0
    raw = gguf.quants.quantize(data, qtype)
    w = pack_gguf(torch.from_numpy(raw), qtype, data.shape)
    assert same_bits(dequantize(w), theirs(raw, qtype))


def test_the_planes_own_their_memory() -> None:
    raw = torch.from_numpy(random_blocks(Q.Q4_0, 4, 256, np.random.default_rng(2)))
    w = pack_gguf(raw, Q.Q4_0, (4, 256))
    assert all(p.untyped_storage().data_ptr() != raw.untyped_storage().data_ptr() for p in w.planes().values())
    assert all(p.is_contiguous() for p in w.planes().values())


def test_bad_rows_are_refused() -> None:
    raw = torch.zeros((4, 18 * 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        pack_gguf(raw, Q.Q4_0, (4, 512))
    with pytest.raises(ValueError, match="no packed layout"):
        pack_gguf(raw, Q.Q2_K, (4, 256))


@pytest.fixture(scope="module", params=[Q.Q4_1, Q.Q5_K, Q.Q6_K, Q.Q8_0], ids=lambda t: t.name)
def packed(request: pytest.FixtureRequest) -> tuple[PackedWeight, torch.Tensor]:
    raw = random_blocks(request.param, 10, 512, np.random.default_rng(3))
    w = pack_gguf(torch.from_numpy(raw), request.param, (10, 512))
    return w, dequantize(w)


def test_rows_and_columns_agree_with_slicing(packed: tuple[PackedWeight, torch.Tensor]) -> None:
    w, full = packed
    assert same_bits(dequantize(w.rows(2, 7)), full[2:7].contiguous())
    assert same_bits(dequantize(w.columns(256, 512)), full[:, 256:512].contiguous())
    assert same_bits(dequantize(w[3:9]), full[3:9].contiguous())
    assert same_bits(dequantize(w[:, :256].clone()), full[:, :256].contiguous())
    assert same_bits(dequantize(w[1:4, 256:]), full[1:4, 256:].contiguous())
    with pytest.raises(ValueError, match="block boundaries"):
        w.columns(0, 100)
    with pytest.raises(IndexError):
        w[::2]


def test_take_pad_and_cat_rows(packed: tuple[PackedWeight, torch.Tensor]) -> None:
    w, full = packed
    index = [7, 0, 0, 9, 3]
    assert same_bits(dequantize(w.take_rows(index)), full[index])
    padded = dequantize(w.pad_rows(3))
    assert same_bits(padded[:10], full) and padded.shape == (13, 512) and bool((padded[10:] == 0).all())
    fused = cat_rows([w.rows(0, 4), w.rows(4, 10)])
    assert same_bits(dequantize(fused), full)


# -- quantize= -----------------------------------------------------------------------------------------------
def weights(n: int = 24, k: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 1, n).unsqueeze(1)   # rows of very different sizes
    w[5] = 0.0
    w[6, 17] = 40.0                                                                # an outlier
    return w


def test_int8_error_bound_and_exact_values() -> None:
    w = weights()
    p = quantize(w, "int8")
    assert p.fmt.name == "int8" and p.q.dtype == torch.int8 and p.d.dtype == torch.float32
    v = dequantize(p)
    d = w.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((v - w).abs() <= d / 2 * (1 + 1e-6) + 1e-30).all())
    assert bool((v[5] == 0).all())
    exact = torch.arange(-127, 128, dtype=torch.float32)[torch.randperm(255)[:128]]
    exact = torch.cat([exact, torch.tensor([127.0] * 128)]).reshape(1, 256) * 2.0**-7
    assert same_bits(dequantize(quantize(exact, "int8")), exact)
    assert p.nbytes() == quantized_nbytes(tuple(w.shape), "int8")


def test_fp8_error_bound_and_exact_values() -> None:
    w = weights()
    p = quantize(w, "fp8")
    assert p.q.dtype == torch.float8_e4m3fn and p.fmt.float_codes
    v = dequantize(p)
    d = w.abs().amax(dim=1, keepdim=True) / 448
    bound = torch.maximum(w.abs() / 16, d * 2.0**-10) * (1 + 1e-5)
    assert bool(((v - w).abs() <= bound).all())
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[torch.isfinite(codes)]
    exact = torch.cat([codes, torch.full((256 - codes.numel() % 256,), 448.0)])[:256].reshape(1, 256) * 2.0**-12
    assert same_bits(dequantize(quantize(exact, "fp8")), exact)


def rtn(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest over [min, max] as quantize's docstring defines it: (step d_rtn, squared error) per group."""
    g = w.reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    m = lo.to(torch.float16)
    m = torch.where(m.float() > lo, torch.nextafter(m, torch.tensor(-np.inf, dtype=torch.float16)), m)
    d = ((hi - m.float()) / 15).to(torch.float16)
    d = torch.where(d.float() < (hi - m.float()) / 15, torch.nextafter(d, torch.tensor(np.inf, dtype=torch.float16)), d)
    q = torch.where(d.float() > 0, (g - m.float()) / d.float(), 0.0).round().clamp(0, 15)
    err = d.float() * q + m.float() - g
    assert bool((err.abs() <= d.float() / 2 * (1 + 1e-6)).all())          # the bound the step guarantees
    return d.float().squeeze(-1), err.square().sum(-1)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_bounds(group: int) -> None:
    w = weights()
    p = quantize(w, "int4", group)
    assert p.fmt.name == f"int4_g{group}" and p.d.dtype == p.m.dtype == torch.float16
    v = dequantize(p)
    step, sse_rtn = rtn(w, group)
    err = (v - w).reshape(w.shape[0], -1, group)
    assert bool((err.abs().amax(-1) <= step * (1 + 1e-6)).all())
    sse = err.square().sum(-1)
    assert bool((sse <= sse_rtn * (1 + 1e-5) + 1e-30).all())
    assert float(sse.sum()) < 0.95 * float(sse_rtn.sum())                  # the search pays on random weights
    assert p.nbytes() == quantized_nbytes(tuple(w.shape), "int4", group)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_keeps_representable_groups_exactly(group: int) -> None:
    gen = torch.Generator().manual_seed(group)
    n, k = 6, 256
    m = (torch.randn(n, k // group, 1, generator=gen) * 0.1).to(torch.float16).float()
    d = (torch.rand(n, k // group, 1, generator=gen) * 0.01 + 1e-3).to(torch.float16).float()
    q = torch.randint(0, 16, (n, k // group, group), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    w = (d * q + m).reshape(n, k)
    assert same_bits(dequantize(quantize(w, "int4", group)), w)


def int4_mse(w: torch.Tensor, group: int) -> tuple[float, float]:
    """(mean squared reconstruction error of int4 at ``group``, the grid's bound for it: mean d_rtn^2 / 12)."""
    step, _ = rtn(w, group)
    return float((dequantize(quantize(w, "int4", group)) - w).square().mean()), float(step.square().mean()) / 12


@pytest.mark.parametrize("kind", ["rows_of_many_sizes", "gaussian", "heavy_tailed"])
def test_int4_error_shrinks_with_the_group(kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    if kind == "rows_of_many_sizes":
        w = weights(k=384)
    elif kind == "gaussian":
        w = torch.randn(64, 384, generator=gen)
    else:   # Student t, 3 degrees of freedom: the outliers a real projection has, a few per group of 128
        w = torch.randn(64, 384, generator=gen) / torch.randn(64, 384, 3, generator=gen).square().mean(-1).sqrt()
    mse = {g: int4_mse(w, g) for g in (32, 64, 128)}
    assert mse[32][0] <= mse[64][0] <= mse[128][0]
    # round to nearest errs uniformly within half a step (mean d^2 / 12); the range search must do better
    assert all(err < bound for err, bound in mse.values()), mse


@pytest.mark.slow
def test_int4_error_shrinks_with_the_group_on_the_demo_weights(demo_gguf: Path) -> None:
    _, plain, _ = open_checkpoint(demo_gguf)
    w = plain.get("model.layers.3.mlp.down_proj.weight").float()       # Q4_1 (groups of 32) in the file
    mse = {g: int4_mse(w, g) for g in (32, 64, 128)}
    assert mse[32][0] == 0.0                                           # the file's own grid comes back exactly
    assert mse[32][0] <= mse[64][0] <= mse[128][0]
    assert all(err < bound for err, bound in mse.values()), mse


def test_int4_narrows_the_group_where_a_width_needs_it(tiny_dir: Path) -> None:
    cfg, plain, _ = open_checkpoint(tiny_dir)                          # hidden 64, intermediate 160
    said: list[str] = []
    served = serve_source(plain, cfg, torch.device("cpu"), LoadOptions(quantize="int4", quant_group=128),
                          status=said.append)
    family = checkpoint.FAMILIES[cfg.family]
    chosen = quantized_names(family.split_rules, family.tensor_names(cfg))
    groups = {}
    for name in chosen:
        got = served.get(name)
        assert isinstance(got, PackedWeight)                           # none left in float
        groups[name] = got.fmt.group
        assert got.nbytes() == served.packed_nbytes(name)
    assert groups["model.layers.0.mlp.down_proj.weight"] == 32 and groups["lm_head.weight"] == 64
    assert set(groups.values()) == {32, 64}
    notices = [m for m in said if "int4 groups" in m]
    assert notices == [f"chatcore: {len(chosen)} projection(s) have a width that is not a multiple of 128; "
                       "they take int4 groups of 64 / 32 columns"]
    assert fit_group(576, 128) == 64 and fit_group(1536, 128) == 128 and fit_group(96, 64) == 32
    with pytest.raises(ValueError, match="not a multiple of 32"):
        fit_group(80, 64)


def test_quantize_refuses_what_it_cannot_pack() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize(torch.zeros(4, 96), "int4", 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.zeros(4, 40), "int8")
    with pytest.raises(ValueError, match="inf or nan"):
        quantize(torch.full((2, 32), float("nan")), "int8")


def test_fp8_is_refused_on_a_gpu_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _dev=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _dev=None: "NVIDIA A100")
    with pytest.raises(LoadOptionError, match="compute capability 8.9"):
        check_device("fp8", torch.device("cuda"))
    check_device("int4", torch.device("cuda"))
    check_device("fp8", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _dev=None: (9, 0))
    check_device("fp8", torch.device("cuda"))


# -- options and the load path -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, fragment", [
    ({"quantize": "int3"}, "unknown quantize 'int3'; use one of int8, int4, fp8"),
    ({"quant_group": 48}, "quant_group must be 32, 64, 128 columns, got 48"),
    ({"kv_dtype": "int4"}, "unknown kv_dtype 'int4'"),
    ({"packed": "yes"}, "packed must be True, False or None"),
    ({"quantize": "int8", "packed": False}, "cannot be combined with packed=False"),
])
def test_load_options_are_checked(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(LoadOptionError, match=fragment) as info:
        LoadOptions(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_kv_dtype_reaches_the_runtime(tiny_dir: Path) -> None:
    cfg = open_checkpoint(tiny_dir)[0]
    runtime = checkpoint.make_runtime(cfg, torch.device("cpu"), torch.float32, LoadOptions(kv_dtype="fp8"))
    assert runtime.kv_dtype == "fp8"
    assert checkpoint.make_runtime(cfg, torch.device("cpu"), torch.float32, LoadOptions()).kv_dtype is None
    with pytest.raises(ValueError, match="kv_dtype"):
        dataclasses.replace(runtime, kv_dtype="int4")


def test_cli_flags_parse() -> None:
    args = _parser().parse_args(["generate", "-p", "hi", "--packed", "--quantize", "int4", "--quant-group", "128",
                                 "--kv-dtype", "fp8"])
    assert (args.packed, args.quantize, args.quant_group, args.kv_dtype) == (True, "int4", 128, "fp8")
    args = _parser().parse_args(["generate", "-p", "hi", "--dequantize"])
    assert (args.packed, args.quantize, args.quant_group, args.kv_dtype) == (False, None, 64, None)
    assert _parser().parse_args(["generate", "-p", "hi"]).packed is None
    for bad in (["--quantize", "int2"], ["--quant-group", "16"], ["--kv-dtype", "bf16"], ["--packed", "--dequantize"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(["generate", "-p", "hi", *bad])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama_dir(tmp_path_factory.mktemp("qfmt-llama"))


@pytest.fixture(scope="module")
def q8_gguf(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tiny_dir, tmp_path_factory.mktemp("qfmt-gguf") / "tiny-q8_0.gguf", qtype=Q.Q8_0)


def test_a_gguf_served_packed(q8_gguf: Path) -> None:
    cfg, plain, _ = open_checkpoint(q8_gguf)
    notices: list[str] = []
    served = serve_source(plain, cfg, torch.device("cpu"), LoadOptions(packed=True), notices.append)
    kinds = {}
    for name, shape in checkpoint.FAMILIES[cfg.family].shapes(cfg).items():
        got = served.get(name)
        kinds[name] = type(got)
        if len(shape) == 2:
            assert isinstance(got, PackedWeight) and got.fmt.name == "q8_0" and got.shape == shape
            assert same_bits(dequantize(got), plain.get(name))     # the reorders (q / k rows) come through
            assert served.packed_nbytes(name) == got.nbytes()
        else:
            assert isinstance(got, torch.Tensor) and got.shape == shape
    assert PackedWeight in kinds.values() and torch.Tensor in kinds.values()
    assert len(notices) == 1 and "slower than float32" in notices[0]


def test_types_without_a_layout_are_dequantized_with_one_notice(q8_gguf: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from chatcore.weights import gguf_file

    monkeypatch.setattr(gguf_file, "PACKABLE", PACKABLE - {Q.Q8_0})   # as if Q8_0 had no packed layout
    cfg, plain, _ = open_checkpoint(q8_gguf)
    notices: list[str] = []
    served = serve_source(plain, cfg, torch.device("cpu"), LoadOptions(packed=True), notices.append)
    assert len(notices) == 1 and notices[0].startswith("chatcore: tensors of type Q8_0 have no packed layout")
    got = served.get("model.layers.0.mlp.up_proj.weight")
    assert isinstance(got, torch.Tensor) and torch.equal(got, plain.get("model.layers.0.mlp.up_proj.weight"))


def test_packed_default_by_device(q8_gguf: Path) -> None:
    cfg, plain, _ = open_checkpoint(q8_gguf)
    name = "model.layers.0.self_attn.q_proj.weight"
    for options in (LoadOptions(), LoadOptions(packed=False)):
        assert isinstance(serve_source(plain, cfg, torch.device("cpu"), options).get(name), torch.Tensor)
    assert isinstance(plain.packed_on("cpu").get(name), PackedWeight)


def test_weight_bytes_count_packed_bytes(q8_gguf: Path) -> None:
    cfg, plain, _ = open_checkpoint(q8_gguf)
    served = serve_source(plain, cfg, torch.device("cpu"), LoadOptions(packed=True))
    shapes = checkpoint.FAMILIES[cfg.family].shapes(cfg)
    want = 0
    for name in shapes:
        got = served.get(name)
        want += got.nbytes() if isinstance(got, PackedWeight) else got.numel() * 2
    assert checkpoint.weight_bytes(cfg, torch.bfloat16, served) == want
    assert checkpoint.weight_bytes(cfg, torch.bfloat16, plain) == checkpoint.weight_bytes(cfg, torch.bfloat16)
    assert want < checkpoint.weight_bytes(cfg, torch.bfloat16)
    free = want + 2000 * checkpoint.window_bytes_per_token(cfg, torch.bfloat16)
    window, notice = checkpoint.fit_window(cfg, torch.device("cpu"), torch.bfloat16, 4096, free, source=served)
    assert window == 1536 and notice is not None                  # 2000 tokens x 0.8, in steps of 256
    assert checkpoint.fit_window(cfg, torch.device("cpu"), torch.bfloat16, 4096, free)[0] < window  # float weights
    assert checkpoint.window_bytes_per_token(cfg, torch.bfloat16, "int8") < checkpoint.window_bytes_per_token(
        cfg, torch.bfloat16)


def test_quantize_on_load(tiny_dir: Path) -> None:
    cfg, plain, _ = open_checkpoint(tiny_dir)
    served = serve_source(plain, cfg, torch.device("cpu"), LoadOptions(quantize="int4", quant_group=32))
    family = checkpoint.FAMILIES[cfg.family]
    chosen = set(quantized_names(family.split_rules, family.tensor_names(cfg)))
    assert "lm_head.weight" in chosen and "model.embed_tokens.weight" not in chosen
    assert all(n.endswith("proj.weight") or n == "lm_head.weight" for n in chosen)
    assert len(chosen) == 7 * cfg.num_layers + 1
    for name in family.tensor_names(cfg):
        got = served.get(name)
        assert isinstance(got, PackedWeight) == (name in chosen)
        if name in chosen:
            assert same_bits(dequantize(got), dequantize(quantize(plain.get(name), "int4", 32)))
    part = served.get_part("model.layers.1.mlp.up_proj.weight", (slice(32, 96),))
    whole = served.get("model.layers.1.mlp.up_proj.weight")
    assert same_bits(dequantize(part), dequantize(whole)[32:96].contiguous())   # rows quantize alone


def test_quantize_refuses_a_quantized_gguf(q8_gguf: Path, tiny_dir: Path, tmp_path: Path) -> None:
    cfg, plain, _ = open_checkpoint(q8_gguf)
    with pytest.raises(LoadOptionError, match=r"already quantized \(Q8_0\); quantize a float checkpoint") as info:
        serve_source(plain, cfg, torch.device("cpu"), LoadOptions(quantize="int8"))
    assert "\n" not in str(info.value)
    f32 = write_gguf(tiny_dir, tmp_path / "tiny-f32.gguf")              # float tensors in a GGUF may be quantized
    cfg, plain, _ = open_checkpoint(f32)
    got = serve_source(plain, cfg, torch.device("cpu"), LoadOptions(quantize="int8")).get("lm_head.weight")
    assert isinstance(got, PackedWeight) and got.fmt.name == "int8"


def test_load_refuses_fp8_before_fetching(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import chatcore
    from chatcore import loader

    monkeypatch.setattr(loader, "pick_device", lambda _d: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _dev=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _dev=None: "NVIDIA RTX 3090")
    with pytest.raises(LoadOptionError, match="fp8"):
        chatcore.load(tmp_path / "missing", quantize="fp8")


@pytest.mark.slow
def test_the_demo_model_packs_bit_exactly(demo_gguf: Path) -> None:
    cfg, plain, _ = open_checkpoint(demo_gguf)
    served = plain.packed_on("cpu")
    shapes = checkpoint.FAMILIES[cfg.family].shapes(cfg)
    projections = [n for n, s in shapes.items() if len(s) == 2]
    assert all(served.packs(n) for n in projections)
    raw = {t.name: t for t in gguf.GGUFReader(demo_gguf).tensors}
    for gguf_name, name in (("blk.0.attn_v", "model.layers.0.self_attn.v_proj.weight"),
                            ("blk.3.ffn_down", "model.layers.3.mlp.down_proj.weight"),
                            ("blk.29.ffn_gate", "model.layers.29.mlp.gate_proj.weight"),
                            ("token_embd", "model.embed_tokens.weight")):
        t = raw[f"{gguf_name}.weight"]
        got = served.get(name)
        assert isinstance(got, PackedWeight) and got.fmt.name == t.tensor_type.name.lower()
        assert t.tensor_type in (Q.Q4_1, Q.Q8_0)            # the file's projections are Q4_1, its embedding Q8_0
        ref = theirs(np.asarray(t.data), t.tensor_type).reshape(got.shape)
        assert same_bits(dequantize(got), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_packing_on_the_gpu_gives_the_same_planes(qtype: Q) -> None:
    raw = torch.from_numpy(random_blocks(qtype, 64, 1024, np.random.default_rng(5)))
    cpu, gpu = pack_gguf(raw, qtype, (64, 1024)), pack_gguf(raw.cuda(), qtype, (64, 1024))
    assert gpu.device.type == "cuda"
    for name, plane in cpu.planes().items():
        assert torch.equal(plane.view(torch.uint8), gpu.planes()[name].cpu().view(torch.uint8)), name
    assert same_bits(dequantize(gpu).cpu(), dequantize(cpu))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
def test_quantize_on_the_gpu_keeps_its_bounds(mode: str) -> None:
    if mode == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no fp8 on this GPU")
    w = weights().cuda()
    v = dequantize(quantize(w, mode, 64)).cpu()
    w = w.cpu()
    if mode == "int4":
        step, _ = rtn(w, 64)
        assert bool(((v - w).reshape(w.shape[0], -1, 64).abs().amax(-1) <= step * (1 + 1e-6)).all())
    else:
        amax = w.abs().amax(dim=1, keepdim=True)
        bound = amax / 254 if mode == "int8" else torch.maximum(w.abs() / 16, amax / 448 * 2.0**-10)
        assert bool(((v - w).abs() <= bound * (1 + 1e-5) + 1e-30).all())


def test_cli_refuses_quantize_on_a_quantized_gguf(q8_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from chatcore.cli import main

    assert main(["generate", "--model", str(q8_gguf), "--prompt", "hi", "--quantize", "int4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("chatcore: error: quantize='int4': tiny-q8_0.gguf is already quantized (Q8_0)")
    assert "\n" not in err
