"""The quantized KV cache (kv_dtype int8 / fp8, a float32 scale per token per head).

The number format (round trip bounds, zero rows), the cache's storage and verbs (bytes per token, growth,
drop's re-rotation), every backend that runs here on a quantized cache in both modes (prompt chunks over the
dequantized keys; the static-cache decode step, the Triton kernel reading codes and scales and quantizing the
appended row itself, under Triton's CPU interpreter), and a small random model generating with a quantized
cache. References: the math backend over the dequantized cache (the same function: float32 rounding apart)
and over the float cache (within the format's error, stated per dtype). ``gpu`` tests: the compiled kernel
and CUDA-graph decode, flash included.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from attention_ref import reference

import chatcore
from chatcore.checkpoint import LoadOptions, build_model, make_runtime, open_checked, window_bytes_per_token
from chatcore.engine import Engine
from chatcore.errors import LoadOptionError
from chatcore.kv_cache import KVCache
from chatcore.layers.attention import attend_chunk, attend_decode
from chatcore.layers.kv_quant import KV_DTYPES, check_kv_dtype, dequantize, quantize
from chatcore.layers.rope import Rotary
from chatcore.runtime import Runtime

MODES = ["int8", "fp8"]
# how far attention over a quantized cache may be from attention over the float cache (relative L2 norm of the
# output, random unit-variance keys and values): int8 keeps ~8 bits of each row, e4m3 ~4
FLOAT_TOL = {"int8": 2e-2, "fp8": 8e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()


def rows(n: int, d: int, seed: int) -> torch.Tensor:
    """Rows of very different magnitudes (and one zero row)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.logspace(-4, 3, n)[:, None]
    x[3] = 0.0
    return x


# ---- the number format

@pytest.mark.parametrize("mode", MODES)
def test_round_trip_is_within_half_a_step(mode: str) -> None:
    dt = KV_DTYPES[mode]
    x = rows(40, 96, 1)
    codes, scales = quantize(x, dt)
    assert codes.dtype == dt and scales.dtype == torch.float32 and scales.shape == (40,)
    back = dequantize(codes, scales, torch.float32)
    assert torch.isfinite(back).all()
    assert scales[3] == 0 and (codes[3].float() == 0).all() and (back[3] == 0).all()   # a zero row: no NaN
    qmax = 127.0 if mode == "int8" else 448.0
    torch.testing.assert_close(scales, x.abs().amax(-1) / qmax, rtol=0, atol=0)
    err = (back - x).abs()
    if mode == "int8":   # a uniform grid of step `scale`: half a step, and float32 rounding of code * scale
        bound = scales[:, None] * 0.5 * (1 + 1e-5)
    else:                # e4m3: 3 mantissa bits (half an ulp: 2^-4 relative); subnormal steps of 2^-9 * scale
        bound = torch.maximum(x.abs() * 2**-4, scales[:, None] * 2**-10) * (1 + 1e-5)
    assert (err <= bound).all()
    # the largest element of each row is a code of full magnitude
    at = x.abs().argmax(-1)
    top = codes.float().gather(1, at[:, None])[:, 0].abs()
    assert torch.equal(top[scales > 0], torch.full_like(top[scales > 0], qmax))


def test_int8_rounds_half_away_from_zero_and_fp8_to_nearest_even() -> None:
    x = torch.tensor([[127.0, 0.5, -0.5, 1.5, -2.5, 0.49]])
    assert quantize(x, torch.int8)[0].tolist() == [[127, 1, -1, 2, -3, 0]]
    y = torch.tensor([[448.0, 127.5, 3 * 2**-10 * 448 / 448, -20.0]])   # scale 1: codes are the values
    codes = quantize(y, torch.float8_e4m3fn)[0].float()
    assert codes.tolist() == [[448.0, 128.0, 2**-8, -20.0]]


def test_kv_dtype_is_checked() -> None:
    cpu = torch.device("cpu")
    check_kv_dtype("fp8", cpu)   # the CPU has the dtype
    with pytest.raises(LoadOptionError, match="kv_dtype"):
        Runtime(device=cpu, dtype=torch.float32, max_seq_len=64, kv_dtype="int4")
    assert Runtime(device=cpu, dtype=torch.float32, max_seq_len=64, kv_dtype="int8").kv_dtype == "int8"


def test_fp8_is_refused_on_a_gpu_without_e4m3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(LoadOptionError, match="compute capability 8.9"):
        check_kv_dtype("fp8", torch.device("cuda"))
    check_kv_dtype("int8", torch.device("cuda"))


# ---- the cache: storage and verbs

def cache(mode: str | None, *, layers: int = 2, heads: int = 3, d: int = 128, capacity: int = 512,
          preallocate: bool = False, dtype: torch.dtype = torch.float32, rotary: Rotary | None = None) -> KVCache:
    return KVCache(num_layers=layers, num_kv_heads=heads, head_dim=d, capacity=capacity, dtype=dtype,
                   device=torch.device("cpu"), rotary=rotary, preallocate=preallocate, kv_dtype=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d", [64, 128])
def test_bytes_per_token_are_d_plus_4_over_2d_of_bf16(mode: str, d: int) -> None:
    for preallocate in (True, False):
        bf16, quant = cache(None, d=d, dtype=torch.bfloat16, preallocate=preallocate), cache(mode, d=d,
                                                                                            preallocate=preallocate)
        for slot in (bf16, quant):
            slot.reserve(300)
        assert bf16.allocated == quant.allocated > 0
        assert Fraction(quant.nbytes(), bf16.nbytes()) == Fraction(d + 4, 2 * d)
        assert quant.nbytes() == 2 * 2 * 3 * quant.allocated * (d + 4)   # layers, k+v, heads, tokens
    cfg = dataclasses.make_dataclass("Cfg", ["num_layers", "num_kv_heads", "head_dim"])(2, 3, d)
    rope = 2 * d * (4 + 2)
    assert Fraction(window_bytes_per_token(cfg, torch.bfloat16, mode) - rope,
                    window_bytes_per_token(cfg, torch.bfloat16) - rope) == Fraction(d + 4, 2 * d)


@pytest.mark.parametrize("mode", MODES)
def test_write_stores_codes_and_returns_what_they_stand_for(mode: str) -> None:
    slot = cache(mode, d=32)
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(20, 3, 32, generator=g), torch.randn(20, 3, 32, generator=g)
    slot.reserve(20)
    with torch.inference_mode():
        keys, values = slot.write(1, 0, k, v)
    codes, scales = quantize(k.transpose(0, 1), KV_DTYPES[mode])
    assert torch.equal(slot.k[1, :, :20].float(), codes.float()) and torch.equal(slot.k_scale[1, :, :20], scales)
    assert keys.dtype == torch.float32 and keys.shape == (3, 20, 32)
    assert torch.equal(keys, dequantize(codes, scales, torch.float32))
    assert torch.equal(values, dequantize(*quantize(v.transpose(0, 1), KV_DTYPES[mode]), torch.float32))
    slot.commit(list(range(20)))
    slot.reserve(400)   # growth keeps codes and scales
    assert slot.allocated >= 420 and slot.k_scale.shape[2] == slot.allocated
    assert torch.equal(slot.layer_kv(1, 20)[0], keys)


# ---- attention on a quantized cache: prompt chunks

def filled(mode: str, hkv: int, s: int, d: int, seed: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """A one-layer cache holding s random rows (written as a model's chunks would), and the float rows."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(s, hkv, d, generator=g), torch.randn(s, hkv, d, generator=g)
    slot = cache(mode, layers=1, heads=hkv, d=d, capacity=max(s, 16))
    slot.reserve(s)
    with torch.inference_mode():
        slot.write(0, 0, k, v)
    slot.commit(list(range(s)))
    return slot, k.transpose(0, 1), v.transpose(0, 1)


CHUNK_CASES = [  # (T, cached before, Hq, Hkv, D, window, alibi)
    (9, 50, 8, 2, 64, None, False),     # GQA, a chunk on a cache
    (1, 70, 8, 2, 32, None, False),     # one token (the triton backend's decode kernel)
    (12, 40, 4, 1, 32, 16, False),      # sliding window, MQA
    (6, 30, 6, 6, 32, None, True),      # ALiBi
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["torch", "math", "triton"])
@pytest.mark.parametrize("case", CHUNK_CASES)
def test_chunks_attend_over_the_dequantized_cache(mode: str, backend: str, case: tuple) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    t, before, hq, hkv, d, window, alibi = case
    slot, kf, vf = filled(mode, hkv, before + t, d, seed=sum(case[:5]))
    g = torch.Generator().manual_seed(t)
    q = torch.randn(t, hq, d, generator=g)
    slopes = torch.rand(hq, generator=g) if alibi else None
    keys, values = slot.layer_kv(0, before + t)
    out = attend_chunk(q, keys, values, start=before, backend=backend, sliding_window=window, alibi=slopes)
    exact = attend_chunk(q.double(), keys.double(), values.double(), start=before, backend="math",
                         sliding_window=window, alibi=slopes)
    float_kv = attend_chunk(q.double(), kf.double(), vf.double(), start=before, backend="math", sliding_window=window,
                            alibi=slopes)
    assert (out.double() - exact).abs().max().item() < 1e-5
    assert rel(out, float_kv) < FLOAT_TOL[mode]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [(8, 2, 32, 20, 24, None, False), (4, 4, 32, 12, 70, 16, True)])
def test_triton_prefill_kernel_on_the_dequantized_cache(mode: str, case: tuple) -> None:
    """The triton backend's prompt-chunk kernel (on the GPU) runs on what a quantized cache's write returns."""
    pytest.importorskip("triton")
    from chatcore.layers.triton_prefill import prefill_attention

    hq, hkv, d, t, before, window, alibi = case
    slot, kf, vf = filled(mode, hkv, before + t, d, seed=t)
    g = torch.Generator().manual_seed(before)
    q = torch.randn(t, hq, d, generator=g)
    slopes = torch.rand(hq, generator=g) if alibi else None
    keys, values = slot.layer_kv(0, before + t)
    out = prefill_attention(q, keys, values, before, sliding_window=window, alibi=slopes, block_m=16, block_n=16,
                            num_warps=1, num_stages=1)
    exact = attend_chunk(q.double(), keys.double(), values.double(), start=before, backend="math",
                         sliding_window=window, alibi=slopes)
    assert (out.double() - exact).abs().max().item() < 1e-5
    float_kv = attend_chunk(q.double(), kf.double(), vf.double(), start=before, backend="math", sliding_window=window,
                            alibi=slopes)
    assert rel(out, float_kv) < FLOAT_TOL[mode]


# ---- attention on a quantized cache: the static-cache decode step

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["triton", "torch", "math"])
@pytest.mark.parametrize("variant", ["rope", "alibi", "window", "sinks"])
def test_decode_step_on_a_quantized_cache(mode: str, backend: str, variant: str) -> None:
    """attend_decode over codes and scales: appends the new row quantized (as kv_quant.quantize does) and
    attends over what the cache then holds; GQA, RoPE, ALiBi, a sliding window, attention sinks."""
    if backend == "triton":
        pytest.importorskip("triton")
    dt = KV_DTYPES[mode]
    g = torch.Generator().manual_seed(len(backend) * 7 + len(variant) + len(mode))
    hq, hkv, d, cap, pos = 8, 2, 32, 160, 140   # 140 keys: several splits, the position inside a block
    window = 24 if variant in ("window", "sinks") else None
    sinks = 4 if variant == "sinks" else 0
    slopes = torch.rand(hq, generator=g) if variant == "alibi" else None
    tables = (torch.randn(cap, d // 2, generator=g), torch.randn(cap, d // 2, generator=g)) \
        if variant == "rope" else None
    q = torch.randn(1, hq, d, generator=g)
    k, v = torch.randn(1, hkv, d, generator=g), torch.randn(1, hkv, d, generator=g)
    kf, vf = torch.randn(hkv, cap, d, generator=g), torch.randn(hkv, cap, d, generator=g)
    kc, ks = quantize(kf, dt)
    vc, vs = quantize(vf, dt)
    kc[:, pos:], vc[:, pos:], ks[:, pos:], vs[:, pos:] = 0, 0, 0, 0
    out = attend_decode(q, kc, vc, pos=torch.tensor([pos], dtype=torch.int32), new_kv=(k, v), backend=backend,
                        sliding_window=window, alibi=slopes, sinks=sinks, rotary=tables, scales=(ks, vs))
    qr, kr = q[0], k[0]
    if tables is not None:
        c, s = tables[0][pos][None, None], tables[1][pos][None, None]
        qr, kr = Rotary.apply(q, c, s)[0], Rotary.apply(k, c, s)[0]
    # the appended row: the quantized rotated key (exact without RoPE; with it, up to the rotation's rounding)
    want_k, want_v = dequantize(*quantize(kr, dt), torch.float32), dequantize(*quantize(v[0], dt), torch.float32)
    got_k, got_v = dequantize(kc[:, pos], ks[:, pos], torch.float32), dequantize(vc[:, pos], vs[:, pos], torch.float32)
    assert torch.equal(got_v, want_v)
    if tables is None:
        assert torch.equal(got_k, want_k)
    else:
        assert (got_k - want_k).abs().max().item() <= ks[:, pos].max().item() * (1.01 if mode == "int8" else 33)
    assert (ks[:, pos + 1:] == 0).all() and (kc[:, pos + 1:].float() == 0).all()   # nothing else written
    held_k, held_v = dequantize(kc, ks, torch.float64), dequantize(vc, vs, torch.float64)
    exact = reference(qr, held_k, held_v, pos, window, sinks, slopes)
    assert (out[0].double() - exact).abs().max().item() < 1e-5
    kf[:, pos], vf[:, pos] = kr, v[0]
    assert rel(out[0], reference(qr, kf, vf, pos, window, sinks, slopes)) < FLOAT_TOL[mode]


@pytest.mark.parametrize("mode", MODES)
def test_flash_decode_on_a_quantized_cache_is_the_triton_kernel(mode: str) -> None:
    """flash-attn 2 has no quantized cache: attend_decode sends the flash backend's step to the triton kernel
    (which needs no flash-attn, so this runs here under the interpreter)."""
    pytest.importorskip("triton")
    dt = KV_DTYPES[mode]
    g = torch.Generator().manual_seed(4)
    hq, hkv, d, cap, pos = 4, 2, 32, 80, 50
    tables = (torch.randn(cap, d // 2, generator=g), torch.randn(cap, d // 2, generator=g))
    q = torch.randn(1, hq, d, generator=g)
    k, v = torch.randn(1, hkv, d, generator=g), torch.randn(1, hkv, d, generator=g)
    kc, ks = quantize(torch.randn(hkv, cap, d, generator=g), dt)
    vc, vs = quantize(torch.randn(hkv, cap, d, generator=g), dt)
    outs = []
    for backend in ("flash", "triton"):
        caches = [x.clone() for x in (kc, vc, ks, vs)]
        outs.append(attend_decode(q, caches[0], caches[1], pos=torch.tensor([pos], dtype=torch.int32),
                                  new_kv=(k, v), backend=backend, rotary=tables, sliding_window=16, sinks=2,
                                  scales=(caches[2], caches[3])))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("mode", MODES)
def test_decode_kernel_attends_to_the_appended_row_as_stored(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel launched as on the GPU (no in-kernel e4m3 grid rounding: converting to the cache dtype rounds)
    attends to the new row's codes as it stores them, whatever that conversion did (the interpreter's even
    rounds some codes wrongly), so the output is the float64 reference over the cache as it then holds. It once
    attended to the values before rounding: fp8 was 2.3% off on the GPU (window 256 + 4 sinks), 1.5-5.6% here;
    int8 codes were integers already. A window with sinks; the new key is half the query, so it weighs."""
    pytest.importorskip("triton")
    from chatcore.layers import triton_decode

    monkeypatch.setattr(triton_decode, "_GRID_ROUNDING", False)
    dt = KV_DTYPES[mode]
    g = torch.Generator().manual_seed(2000)
    hq, hkv, d, cap, pos, window, sinks = 8, 2, 32, 200, 190, 64, 4
    q = torch.randn(hq, d, generator=g)
    k, v = q[:: hq // hkv] * 0.5, torch.randn(hkv, d, generator=g) * 3
    kc, ks = quantize(torch.randn(hkv, cap, d, generator=g), dt)
    vc, vs = quantize(torch.randn(hkv, cap, d, generator=g), dt)
    out = triton_decode.decode_attention(q, kc, vc, torch.tensor([pos], dtype=torch.int32), new_kv=(k, v),
                                         sliding_window=window, sinks=sinks, scales=(ks, vs))
    held = reference(q, dequantize(kc, ks, torch.float64), dequantize(vc, vs, torch.float64), pos, window, sinks,
                     None)
    assert rel(out, held) < 1e-5
    kc[:, pos], vc[:, pos], ks[:, pos], vs[:, pos] = 0, 0, 0, 0        # the row before it was appended
    unrounded_k, unrounded_v = (dequantize(c, sc, torch.float64) for c, sc in ((kc, ks), (vc, vs)))
    unrounded_k[:, pos], unrounded_v[:, pos] = k.double(), v.double()
    assert rel(held, reference(q, unrounded_k, unrounded_v, pos, window, sinks, None)) > 1e-3   # the row weighs


def test_decode_kernel_refuses_codes_without_scales() -> None:
    pytest.importorskip("triton")
    from chatcore.layers.triton_decode import decode_attention

    q, kc = torch.randn(4, 16), torch.zeros(2, 32, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="needs its scales"):
        decode_attention(q, kc, kc.clone(), torch.tensor([3], dtype=torch.int32))


# ---- drop (a context shift) on a quantized cache

def engine_with(path: Path, kv_dtype: str | None, *, backend: str = "torch", window: int = 512,
                chunk: int = 32) -> Engine:
    """A CPU float32 engine whose runtime has ``kv_dtype`` (what ``chatcore.load(kv_dtype=...)`` builds)."""
    cfg, source, tokenizer = open_checked(path)
    rt = make_runtime(cfg, torch.device("cpu"), torch.float32,
                      LoadOptions(max_seq_len=window, prefill_chunk=chunk, attention=backend))
    rt = dataclasses.replace(rt, kv_dtype=kv_dtype)
    return Engine(build_model(cfg, rt, source.get), cfg, rt, tokenizer, source=str(path))


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("mode", MODES)
def test_drop_rerotates_a_quantized_cache(tiny_llama_dir: Path, mode: str) -> None:
    engine = engine_with(tiny_llama_dir, mode)
    seq = ids(200, 0)
    slot = engine.new_slot()
    engine.prefill(seq, slot)
    slot.drop(4, 90)
    kept = seq[:4] + seq[90:]
    assert slot.tokens == kept
    fresh = engine.new_slot()
    engine.prefill(kept, fresh)
    n = len(kept)
    # layer 0's rows depend only on token and position: values move as they were (the same codes and scales
    # as a fresh write), keys are re-rotated from their dequantized values and quantized again: within a step
    # and a half of each row's scale (int8) or of its e4m3 rounding, of the fresh quantized key
    assert torch.equal(slot.v[0, :, :n].float(), fresh.v[0, :, :n].float())
    assert torch.equal(slot.v_scale[0, :, :n], fresh.v_scale[0, :, :n])
    got, want = slot.layer_kv(0, n)[0], fresh.layer_kv(0, n)[0]
    step = fresh.k_scale[0, :, :n, None]
    if mode == "int8":
        assert ((got - want).abs() <= 1.5 * step + 1e-6).all()
    else:
        # e4m3 rounds to 2^-4 of each element; the rotation mixes an element with its partner: 3 * 2^-4 of amax
        assert ((got - want).abs() <= 3 * 2**-4 * 448 * step + 1e-6).all()
    assert torch.equal(slot.k[:, :, :4].float(), fresh.k[:, :, :4].float())   # the sinks did not move
    # and the float cache's drop, for scale: the quantized keys stay within the format's error of it
    ref = engine_with(tiny_llama_dir, None)
    fslot = ref.new_slot()
    ref.prefill(kept, fslot)
    assert rel(got, fslot.k[0, :, :n]) < FLOAT_TOL[mode]


# ---- a model generating with a quantized cache

@pytest.fixture(scope="module")
def float_engine(tiny_llama_dir: Path) -> Engine:
    return engine_with(tiny_llama_dir, None)


# logits of the small random model (float32, 3 layers) with a quantized cache vs the float cache: max |diff|
LOGIT_TOL = {"int8": 0.05, "fp8": 0.25}


@pytest.mark.parametrize("mode", MODES)
def test_model_logits_and_greedy_tokens_with_a_quantized_cache(tiny_llama_dir: Path, float_engine: Engine,
                                                               mode: str) -> None:
    engine = engine_with(tiny_llama_dir, mode)
    prompt = ids(70, 3)
    want = float_engine.prefill(prompt, float_engine.new_slot(), all_logits=True)
    got = engine.prefill(prompt, engine.new_slot(), all_logits=True)
    assert (got - want).abs().max().item() < LOGIT_TOL[mode]
    # greedy: both models' tokens agree while the float model's top-2 margin is large
    params = chatcore.SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    fslot, qslot = float_engine.new_slot(), engine.new_slot()
    ftokens = [ev.token_id for ev in float_engine.generate(prompt, params, slot=fslot)]
    qtokens = [ev.token_id for ev in engine.generate(prompt, params, slot=qslot)]
    logits = float_engine.prefill(prompt + ftokens, float_engine.new_slot(), all_logits=True)[len(prompt) - 1: -1]
    top2 = logits.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    # logits within LOGIT_TOL of each other can only disagree on the argmax where the margin is below twice it
    for i, (a, b) in enumerate(zip(ftokens, qtokens, strict=True)):
        if a != b:
            assert margin[i].item() < 2 * LOGIT_TOL[mode], (i, ftokens, qtokens, margin.tolist())
            break
    assert ftokens[0] == qtokens[0] or margin[0].item() < 2 * LOGIT_TOL[mode]
    d = engine.config.head_dim   # float32 compute: codes and scales are (D + 4) / (4 D) of the float cache
    assert qslot.allocated == fslot.allocated and Fraction(qslot.nbytes(), fslot.nbytes()) == Fraction(d + 4, 4 * d)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_device_decode_step_with_a_quantized_cache_matches_the_eager_step(tiny_llama_dir: Path, mode: str,
                                                                         backend: str) -> None:
    """The device-position step (what a CUDA graph captures) on a quantized slot computes what the eager step
    computes on one: the same codes appended, logits equal to float32 rounding, through a context shift."""
    if backend == "triton":
        pytest.importorskip("triton")
    engine = engine_with(tiny_llama_dir, mode, backend=backend, window=96, chunk=16)
    model = engine.model
    prompt = ids(50, 5)
    eager, static = model.new_slot(96), model.new_slot(96, preallocate=True)
    le, ls = engine.prefill(prompt, eager)[-1], engine.prefill(prompt, static)[-1]
    pos, token = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.long)
    steps = 5 if backend == "triton" else 12
    for step in range(steps):
        if step == steps - 2:
            eager.drop(4, 30)
            static.drop(4, 30)
        t = int(le.argmax())
        assert int(ls.argmax()) == t
        with torch.inference_mode():
            le = model.forward(torch.tensor([t]), eager)[-1]
            eager.commit([t])
            token.fill_(t)
            pos.fill_(static.length)
            ls = model.decode(token, pos, static, 96 if backend == "triton" else 64)[-1]
            static.commit([t])
        assert (le - ls).abs().max().item() < 1e-4, f"step {step}"
    n = eager.length
    ke, ks_ = eager.layer_kv(0, n)[0], static.layer_kv(0, n)[0]
    assert (ke - ks_).abs().max().item() <= 1e-5 + eager.k_scale[0, :, :n].max().item() * 0.01


# ---- on the GPU (the lead runs these)

@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [(32, 8, 128, 4096, 3000, None, 0), (32, 8, 128, 33024, 32700, None, 0),
                                  (16, 2, 64, 2048, 2000, 256, 4)])
def test_compiled_decode_kernel_on_a_quantized_cache(mode: str, case: tuple) -> None:
    from chatcore.layers.triton_decode import decode_attention

    hq, hkv, d, cap, pos, window, sinks = case
    dt = KV_DTYPES[mode]
    g = torch.Generator(device="cuda").manual_seed(pos)
    q = torch.randn(hq, d, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(hkv, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    kc, ks = quantize(torch.randn(hkv, cap, d, device="cuda", generator=g), dt)
    vc, vs = quantize(torch.randn(hkv, cap, d, device="cuda", generator=g), dt)
    tables = tuple(torch.randn(cap, d // 2, device="cuda", generator=g) for _ in range(2))
    out = decode_attention(q, kc, vc, torch.tensor([pos], dtype=torch.int32, device="cuda"), new_kv=(k, v),
                           rotary=tables, sliding_window=window, sinks=sinks, scales=(ks, vs))
    c, s = tables[0][pos][None, None], tables[1][pos][None, None]   # float32 tables, as the kernel takes them
    qr, kr = Rotary.apply(q[None].float(), c, s)[0], Rotary.apply(k[None].float(), c, s)[0]
    # the appended value: kv_quant's scale (to float32 division rounding) and codes within one step of its own
    want_v = quantize(v, dt)
    torch.testing.assert_close(vs[:, pos], want_v[1], rtol=1e-6, atol=0)
    step = 1.0 if mode == "int8" else 32.0   # an e4m3 step near 448
    assert ((vc[:, pos].float() - want_v[0].float()).abs() <= step).all()
    assert rel(dequantize(vc[:, pos], vs[:, pos], torch.float32), v.float()) < FLOAT_TOL[mode]
    got_k = dequantize(kc[:, pos], ks[:, pos], torch.float32)
    assert rel(got_k, kr.float()) < FLOAT_TOL[mode]
    # like with like: the kernel's query is rotated and rounded to bf16 in registers, and it attends to the
    # codes it stored (the rest of the error: bf16 probabilities x value scales in the PV dot)
    exact = reference(qr.bfloat16().float().cpu(), dequantize(kc, ks, torch.float64).cpu(),
                      dequantize(vc, vs, torch.float64).cpu(), pos, window, sinks, None)
    assert rel(out.cpu(), exact) < 1e-2


def gpu_engine(path: Path, kv_dtype: str | None, backend: str, dtype: torch.dtype, graphs: bool,
               window: int = 512) -> Engine:
    cfg, source, tokenizer = open_checked(path)
    rt = make_runtime(cfg, torch.device("cuda"), dtype,
                      LoadOptions(max_seq_len=window, prefill_chunk=64, attention=backend, cuda_graphs=graphs))
    rt = dataclasses.replace(rt, kv_dtype=kv_dtype)
    return Engine(build_model(cfg, rt, source.get), cfg, rt, tokenizer)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["flash", "triton", "torch"])
def test_cuda_graph_decode_with_a_quantized_cache(tiny_llama_dir: Path, mode: str, backend: str) -> None:
    """CUDA-graph decode on a quantized slot (flash: its decode step takes the triton kernel, its chunks the
    dequantized keys; bf16 there, float32 for the others) picks only tokens within a few times the logit error
    of the best one of a float32 eager engine on the same quantized cache."""
    if backend == "flash":
        pytest.importorskip("flash_attn")
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.bfloat16 if backend == "flash" else torch.float32
    engine = gpu_engine(tiny_llama_dir, mode, backend, dtype, graphs=True)
    ref = gpu_engine(tiny_llama_dir, mode, "torch", torch.float32, graphs=False)
    slot = engine.new_slot()
    assert slot.quantized and slot.k.dtype == KV_DTYPES[mode] and slot.allocated == slot.capacity
    prompt = ids(100, 8)
    params = chatcore.SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    tokens = [ev.token_id for ev in engine.generate(prompt, params, slot=slot)]
    assert slot.decode_graph is not None
    seq = prompt + tokens
    want, got = ref.logits(seq), engine.logits(seq)
    err = (got - want).abs().max().item()
    rows = want[len(prompt) - 1 : -1]
    gap = rows.max(-1).values - rows[torch.arange(len(tokens)), torch.tensor(tokens)]
    assert gap.max().item() <= 4 * err + 1e-3, (gap.max().item(), err)
    if backend == "torch":   # the same quantization and attention, graphed or not: the same tokens
        assert tokens == [ev.token_id for ev in ref.generate(prompt, params)]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_sink_window_stream_on_a_quantized_cache_runs_through_the_graph(tiny_llama_dir: Path, mode: str) -> None:
    """Past the window: context shifts re-rotate the quantized keys while the graph keeps replaying."""
    graphed = gpu_engine(tiny_llama_dir, mode, "torch", torch.float32, graphs=True, window=128)
    plain = gpu_engine(tiny_llama_dir, mode, "torch", torch.float32, graphs=False, window=128)
    params = chatcore.SamplingParams(temperature=0.0, max_new_tokens=300, ignore_eos=True)
    a = [ev.token_id for ev in graphed.generate(ids(60, 4), params, sink_tokens=4)]
    b = [ev.token_id for ev in plain.generate(ids(60, 4), params, sink_tokens=4)]
    assert len(a) == 300 and a == b


@pytest.mark.parametrize("mode", MODES)
def test_drop_on_a_quantized_cache_rerotates_each_gemma3_layer_with_its_own_frequencies(
        tmp_path: Path, mode: str) -> None:
    """Gemma 3's local and global layers have different RoPE bases: each layer's moved keys are re-rotated with
    its own table, as the float cache's drop (all layers at once) re-rotates them."""
    from tests.model_factory import make_gemma3_dir

    path = make_gemma3_dir(tmp_path / "g3", seed=2)
    engine, ref = engine_with(path, mode), engine_with(path, None)
    seq = ids(120, 5)
    slot, fslot = engine.new_slot(), ref.new_slot()
    engine.prefill(seq, slot)
    ref.prefill(seq, fslot)
    slot.drop(4, 50)
    fslot.drop(4, 50)
    n = slot.length
    for layer in range(slot.k.shape[0]):
        assert rel(slot.layer_kv(layer, n)[0], fslot.k[layer, :, :n]) < FLOAT_TOL[mode], layer
