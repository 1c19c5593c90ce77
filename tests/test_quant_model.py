"""Every model family and tensor parallel with packed (quantized) weights, on the CPU in float32.

Each model is built twice from the same checkpoint: once with its projections, embedding and head served as
:class:`~chatcore.quant.packed.PackedWeight` (the test-local quantizer of ``quant_factory``), once with the
reference dequantization of those packed weights as float tensors. Same values, same ops: logits agree to
float32 rounding (layouts and fused shapes differ) and greedy tokens are identical through prompt chunks,
decode and a reused slot. Mixed formats in one fused projection (:class:`~chatcore.quant.weight.RowParts`),
the weight helpers one by one, a packed tensor-parallel run (world 2, gloo) against the one-process packed
model, a split that would cut a super-block, and (``gpu``) the CUDA decode path through the fused kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue as queue_module
import socket
import time
from pathlib import Path

import model_factory
import pytest
import torch
import torch.nn.functional as F
from family_check import prompt
from model_factory import randomize_biases
from quant_factory import FORMATS, every_matrix, opened_packed, quantize

from chatcore import SamplingParams
from chatcore.checkpoint import LoadOptions, build_model, load_engine, make_runtime
from chatcore.errors import ChatcoreError, TensorParallelError
from chatcore.layers.activation import gate_up_silu, silu_mul
from chatcore.layers.linear import for_linear, linear
from chatcore.parallel.shard import RankShard, reader, shard_tensor
from chatcore.quant.packed import PackedWeight, dequantize
from chatcore.quant.weight import (
    BlockCutError,
    RowParts,
    embedding,
    fuse_rows,
    pad_rows,
    reorder_rows,
    slice_weight,
    weight_nbytes,
)

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
CPU = torch.device("cpu")
KQUANT_SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=64)

VARIANTS = {  # name: (family, transformers config overrides, default format, {name part: format})
    "llama-q4_1-mixed": ("llama", {}, "q4_1", {"v_proj": "q8_0", "down_proj": "q5_0"}),
    "llama-kquants": ("llama", KQUANT_SHAPE, "q4_k", {"v_proj": "q6_k", "down_proj": "q6_k"}),
    "mistral-q8_0": ("mistral", {}, "q8_0", {}),
    "qwen2-tied-q5_0": ("qwen2", {"tie_word_embeddings": True}, "q5_0", {"up_proj": "q8_0"}),
    "qwen3-q4_1": ("qwen3", {"attention_bias": True}, "q4_1", {}),
    "gemma3-q8_0-mixed": ("gemma3", {}, "q8_0", {"k_proj": "q4_1"}),
    "bloom-q4_1": ("bloom", {"n_head": 4, "hidden_size": 64}, "q4_1", {}),
    "mpt-q8_0": ("mpt", {"n_heads": 4, "d_model": 64}, "q8_0", {"out_proj": "q4_1"}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    family, overrides, fmt, by_part = VARIANTS[request.param]
    maker = getattr(model_factory, f"make_{family}_dir")
    path = randomize_biases(maker(tmp_path_factory.mktemp(request.param), seed=5, **overrides))
    return path, every_matrix(fmt, **by_part), by_part


def _engine(path: Path, plan, *, dense: bool):  # noqa: ANN001, ANN202
    opened = opened_packed(path, plan, dense=dense)
    return load_engine(path, opened, CPU, torch.float32, LoadOptions(prefill_chunk=16))


def _tokens(engine, ids: list[int], slot=None) -> list[int]:  # noqa: ANN001
    return [ev.token_id for ev in engine.generate(ids, GREEDY, slot=slot)]


def _weights(model) -> list[object]:  # noqa: ANN001
    out = [model.embed, model.lm_head]
    for layer in model.layers:
        out += [getattr(layer, n) for n in layer.__slots__ if n.startswith("w")]
    return out


def test_packed_model_equals_its_dequantized_model(variant) -> None:  # noqa: ANN001
    path, plan, by_part = variant
    packed, dense = _engine(path, plan, dense=False), _engine(path, plan, dense=True)
    weights = _weights(packed.model)
    assert all(isinstance(w, PackedWeight | RowParts) for w in weights), "a weight was not kept packed"
    assert any(isinstance(w, RowParts) for w in weights) == any(
        p in ("v_proj", "k_proj", "up_proj") for p in by_part), "mixed formats in a fused projection"
    packed_bytes = sum(weight_nbytes(w) for w in weights)
    dense_bytes = sum(weight_nbytes(w) for w in _weights(dense.model))
    assert packed_bytes < dense_bytes / 3

    ids = prompt(40, seed=1)
    torch.testing.assert_close(packed.logits(ids), dense.logits(ids), rtol=1e-5, atol=1e-5)
    slot_p, slot_d = packed.new_slot(), dense.new_slot()
    first = _tokens(packed, ids, slot_p)
    assert first == _tokens(dense, ids, slot_d)
    second = ids + first + prompt(9, seed=3)
    assert _tokens(packed, second, slot_p) == _tokens(dense, second, slot_d)
    assert slot_p.length == slot_d.length == len(second) + GREEDY.max_new_tokens - 1
    one = prompt(5, seed=4)   # decode logits: a one-token forward pass after the slot's tokens
    torch.testing.assert_close(packed.prefill(one, slot_p, all_logits=True),
                               dense.prefill(one, slot_d, all_logits=True), rtol=1e-5, atol=1e-5)


# -- the weight helpers ---------------------------------------------------------------------------------------

def _w(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_fuse_rows_keeps_one_format_packed_and_mixes_in_row_parts() -> None:
    a, b, c = (quantize(_w(32, 64, s), FORMATS["q4_1"]) for s in (1, 2, 3))
    fused = fuse_rows([a, b, c])
    assert isinstance(fused, PackedWeight) and fused.shape == (96, 64)
    assert torch.equal(dequantize(fused), torch.cat([dequantize(w) for w in (a, b, c)]))
    t = _w(8, 64, 4)
    assert torch.equal(fuse_rows([t, t]), torch.cat([t, t]))
    v = quantize(_w(16, 64, 5), FORMATS["q8_0"])
    mixed = fuse_rows([a, b, v])
    assert isinstance(mixed, RowParts) and mixed.sizes == [64, 16] and mixed.shape == (80, 64)
    assert isinstance(fuse_rows([mixed, t]), RowParts) and fuse_rows([mixed, t]).sizes == [64, 16, 8]
    assert weight_nbytes(mixed) == a.nbytes() + b.nbytes() + v.nbytes()

    x, bias = _w(3, 64, 6), torch.randn(80)
    ref = F.linear(x, torch.cat([dequantize(a), dequantize(b), dequantize(v)]), bias)
    norm = (torch.rand(64) + 0.5, 1e-5)
    torch.testing.assert_close(linear(x, mixed, bias), ref, rtol=1e-6, atol=1e-6)
    res = _w(3, 80, 7)
    normed = F.rms_norm(x, (64,), norm[0], norm[1])
    torch.testing.assert_close(linear(x, mixed, bias, norm=norm, residual=res),
                               res + F.linear(normed, torch.cat([dequantize(w) for w in (a, b, v)]), bias),
                               rtol=1e-6, atol=1e-6)
    gate_up = fuse_rows([a, v.rows(0, 16), quantize(_w(16, 64, 8), FORMATS["q5_0"])])   # 32 gate, 32 up rows
    assert isinstance(gate_up, RowParts) and len(gate_up.parts) == 3
    values = torch.cat([dequantize(p) for p in gate_up.parts])
    for rows in (x, x[:1]):
        torch.testing.assert_close(gate_up_silu(rows, gate_up), silu_mul(F.linear(rows, values)), rtol=1e-6,
                                   atol=1e-6)


def test_linear_on_a_packed_weight_is_f_linear_on_its_dequantization() -> None:
    for name in FORMATS:
        k = 256 if name.endswith("_k") else 96
        w = quantize(_w(40, k, 1), FORMATS[name])
        x = _w(5, k, 2)
        assert for_linear(w) is w
        assert torch.equal(linear(x, w), F.linear(x, dequantize(w)))
        assert torch.equal(gate_up_silu(x[:1], w), silu_mul(F.linear(x[:1], dequantize(w))))
        assert torch.equal(linear(x, w, torch.ones(40), residual=torch.ones(5, 40)),
                           torch.ones(5, 40) + F.linear(x, dequantize(w), torch.ones(40)))


def test_embedding_gathers_packed_rows() -> None:
    table = quantize(_w(50, 64, 1), FORMATS["q4_1"])
    ids = torch.tensor([3, 0, 49, 3, 17])
    assert torch.equal(embedding(ids, table, torch.float32), dequantize(table)[ids])
    assert torch.equal(embedding(ids, table, torch.bfloat16), dequantize(table, torch.bfloat16)[ids])
    dense = dequantize(table)
    assert torch.equal(embedding(ids, dense, torch.float32), dense[ids])


def test_row_reorder_slices_and_padding_of_packed_weights() -> None:
    w = quantize(_w(24, 512, 1), FORMATS["q4_k"])
    heads = 4

    def per_head(t: torch.Tensor) -> torch.Tensor:   # BLOOM's regrouping, on rows
        return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    moved = reorder_rows(w, per_head)
    assert isinstance(moved, PackedWeight)
    assert torch.equal(dequantize(moved), per_head(dequantize(w)))
    mixed = fuse_rows([w.rows(0, 12), quantize(_w(12, 512, 2), FORMATS["q6_k"])])
    full = torch.cat([dequantize(p) for p in mixed.parts])
    moved_mixed = reorder_rows(mixed, per_head)
    parts = moved_mixed.parts if isinstance(moved_mixed, RowParts) else (moved_mixed,)
    assert torch.equal(torch.cat([dequantize(p) for p in parts]), per_head(full))

    part = slice_weight(w, (slice(4, 10), slice(256, 512)))
    assert isinstance(part, PackedWeight) and part.shape == (6, 256)
    assert torch.equal(dequantize(part), dequantize(w)[4:10, 256:512])
    with pytest.raises(BlockCutError, match="256-column"):
        slice_weight(w, (slice(None), slice(0, 128)))
    padded = pad_rows(w.rows(0, 5), 8)
    assert padded.shape == (8, 512)
    assert torch.equal(dequantize(padded), torch.cat([dequantize(w)[:5], torch.zeros(3, 512)]))


def test_shards_of_packed_tensors_are_slices_of_their_values(tmp_path: Path) -> None:
    path = model_factory.make_llama_dir(tmp_path / "m", vocab_size=321, intermediate_size=128)
    cfg, source, _ = opened_packed(path, every_matrix("q4_1"))
    read = reader(source)
    for rank in (0, 1):
        plan = RankShard(cfg, 2, rank)
        for name, rows, cols in (("model.layers.0.self_attn.q_proj.weight", slice(32 * rank, 32 * rank + 32), None),
                                 ("model.layers.0.self_attn.o_proj.weight", None, slice(32 * rank, 32 * rank + 32)),
                                 ("model.layers.0.mlp.down_proj.weight", None, slice(64 * rank, 64 * rank + 64)),
                                 ("model.embed_tokens.weight", slice(161 * rank, 161 * rank + 161), None)):
            part = shard_tensor(plan, "llama", name, read)
            assert isinstance(part, PackedWeight), name
            whole = dequantize(source.get(name))
            want = whole[rows] if rows is not None else whole[:, cols]
            if name.startswith("model.embed") and rank == 1:
                want = torch.cat([want, torch.zeros(1, want.shape[1])])   # the last rank's padding row
            assert torch.equal(dequantize(part), want), name


def test_a_split_that_cuts_a_super_block_is_refused(tmp_path: Path) -> None:
    small = model_factory.make_llama_dir(tmp_path / "small")   # MLP width 160: halves of 80 cut 32-column blocks
    cfg, source, _ = opened_packed(small, every_matrix("q8_0"))
    with pytest.raises(TensorParallelError, match=r"down_proj.* 32-column block of its 160 input columns"):
        shard_tensor(RankShard(cfg, 2, 1), "llama", "model.layers.1.mlp.down_proj.weight", reader(source))
    path = model_factory.make_llama_dir(tmp_path / "m", **KQUANT_SHAPE)
    cfg, source, _ = opened_packed(path, every_matrix("q4_k"))
    cut = r"tensor_parallel=2 would cut \S*o_proj\S* \(q4_k\) inside a 256-column block"
    with pytest.raises(TensorParallelError, match=cut):
        shard_tensor(RankShard(cfg, 2, 0), "llama", "model.layers.0.self_attn.o_proj.weight", reader(source))
    # the MLP's 512 columns split on a block boundary
    assert isinstance(shard_tensor(RankShard(cfg, 2, 1), "llama", "model.layers.0.mlp.down_proj.weight",
                                   reader(source)), PackedWeight)


# -- tensor parallel (world 2, gloo) ------------------------------------------------------------------------

def _scenario(model, runtime) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Logits of a 40-token prompt in chunks of 16, then 6 greedy decode steps (their logits and tokens)."""
    ids = prompt(40, seed=1, vocab=321)
    slot = model.new_slot(64)
    out = []
    with torch.inference_mode():
        for i in range(0, 40, 16):
            chunk = ids[i:i + 16]
            out.append(model.forward(torch.tensor(chunk), slot, all_logits=True))
            slot.commit(chunk)
        steps, toks = [], []
        for _ in range(6):
            tok = int(out[-1][-1].argmax()) if not steps else int(steps[-1].argmax())
            toks.append(tok)
            steps.append(model.forward(torch.tensor([tok]), slot)[-1])
            slot.commit([tok])
    return {"prefill": torch.cat(out), "decode": torch.stack(steps), "tokens": torch.tensor(toks)}


def _rank(rank: int, port: int, path: str, queue) -> None:  # noqa: ANN001
    import torch.distributed as dist

    from chatcore.parallel.shard import build_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg, source, _ = opened_packed(Path(path), every_matrix("q4_1", v_proj="q8_0"))
        runtime = make_runtime(cfg, CPU, torch.float32, LoadOptions(prefill_chunk=16))
        model = build_shard(cfg, source, RankShard(cfg, 2, rank), runtime)
        fused = RowParts if cfg.family == "llama" else PackedWeight   # BLOOM's qkv is one tensor (one format)
        assert isinstance(model.layers[0].wqkv, fused) and isinstance(model.embed, PackedWeight)
        result = _scenario(model, runtime)
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_tensor_parallel_packed_matches_one_process(family: str, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    overrides = {"hidden_size": 64, "n_head": 4} if family == "bloom" else {"intermediate_size": 128}
    maker = getattr(model_factory, f"make_{family}_dir")
    path = randomize_biases(maker(tmp_path / family, vocab_size=321, **overrides))
    cfg, source, _ = opened_packed(path, every_matrix("q4_1", v_proj="q8_0"))
    runtime = make_runtime(cfg, CPU, torch.float32, LoadOptions(prefill_chunk=16))
    ref = _scenario(build_model(cfg, runtime, source.get), runtime)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = None
    try:
        deadline = time.monotonic() + 240
        while got is None and time.monotonic() < deadline:
            with contextlib.suppress(queue_module.Empty):
                got = queue.get(timeout=1)
            if got is None and any(p.exitcode not in (None, 0) for p in procs):
                break   # a rank failed (its traceback is on stderr)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert got is not None and all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert torch.equal(got["tokens"], ref["tokens"])
    for key in ("prefill", "decode"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-4)


# -- the GPU decode path (the lead runs it) --------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["q4_k", "q8_0"])
def test_cuda_decode_with_packed_weights_matches_dequantized_bf16(fmt: str, tmp_path: Path) -> None:
    """Decode in a CUDA graph through the fused dequantize GEMV kernels, against the same packed weights
    dequantized to bf16 (cuBLAS / the bf16 Triton GEMV), teacher-forced on the bf16 model's greedy tokens: each
    step's logits within bf16 rounding, and the same greedy token wherever the bf16 model's top two logits
    are apart by more than that rounding."""
    path = model_factory.make_llama_dir(tmp_path / "m", **KQUANT_SHAPE)
    cuda = torch.device("cuda")
    plan = every_matrix(fmt, v_proj="q6_k") if fmt == "q4_k" else every_matrix(fmt)
    options = LoadOptions(prefill_chunk=16, cuda_graphs=True)
    engines = {}
    for dense in (False, True):
        cfg, source, tok = opened_packed(path, plan, dense=dense)
        engines[dense] = load_engine(path, (cfg, source, tok), cuda, torch.bfloat16, options)
    model = engines[False].model
    assert isinstance(model.layers[0].w_gate_up, PackedWeight) and isinstance(model.lm_head, PackedWeight)
    ids = prompt(40, seed=1)
    greedy = dataclasses.replace(GREEDY, max_new_tokens=24)
    forced = [ev.token_id for ev in engines[True].generate(ids, greedy)]
    tol = 0.1   # same weight values in both: bf16 activations round apart, ~0.07 on a logit after the cascade
    slots = {d: e.new_slot(128) for d, e in engines.items()}
    steps = {d: [e.prefill(ids, slots[d])[-1].float()] for d, e in engines.items()}
    for token in forced[:-1]:
        for d, e in engines.items():
            steps[d].append(e._step(token, slots[d]).float())
    assert all(s.decode_graph is not None for s in slots.values()), "decode ran outside a CUDA graph"
    checked = 0
    for ours, ref in zip(steps[False], steps[True], strict=True):
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
        top2 = ref.topk(2).values
        if top2[0] - top2[1] > 2 * tol:
            assert int(ours.argmax()) == int(ref.argmax())
            checked += 1
    assert checked >= len(forced) // 3   # steps with a clear top-1 margin (11 of 24 on the H200)
    assert [int(s.argmax()) for s in steps[True]] == forced


# -- end to end: a GGUF file loaded packed -------------------------------------------------------------------

@pytest.mark.parametrize(("family", "qtype"), [("llama", "Q8_0"), ("llama", "Q4_0"), ("bloom", "Q4_1"),
                                              ("qwen2", "Q5_0")])
def test_gguf_loaded_packed_gives_the_tokens_of_the_dequantized_file(family: str, qtype: str,
                                                                     tmp_path: Path) -> None:
    pytest.importorskip("chatcore.quant.gguf_pack")   # the GGUF repack (qfmt's part of #15)
    import gguf
    from gguf_convert import write_gguf

    import chatcore

    overrides = {"hidden_size": 64, "n_head": 4} if family == "bloom" else {}
    hf = getattr(model_factory, f"make_{family}_dir")(tmp_path / family, seed=7, **overrides)
    path = write_gguf(hf, tmp_path / f"{family}.gguf", qtype=getattr(gguf.GGMLQuantizationType, qtype))
    packed = chatcore.load(path, device="cpu", dtype="float32", prefill_chunk=16, packed=True)
    dense = chatcore.load(path, device="cpu", dtype="float32", prefill_chunk=16, packed=False)
    weights = _weights(packed.model)
    assert all(isinstance(w, PackedWeight) for w in weights)
    assert not any(isinstance(w, PackedWeight | RowParts) for w in _weights(dense.model))
    ids = prompt(40, seed=1)
    torch.testing.assert_close(packed.logits(ids), dense.logits(ids), rtol=1e-5, atol=1e-5)
    assert _tokens(packed, ids) == _tokens(dense, ids)


def test_gguf_packed_tensor_parallel_matches_one_process(tmp_path: Path) -> None:
    """The whole launch path (worker ranks open the file, serve it packed, cut their shards packed)."""
    pytest.importorskip("chatcore.quant.gguf_pack")
    import gguf
    from gguf_convert import write_gguf

    import chatcore

    hf = model_factory.make_llama_dir(tmp_path / "l", vocab_size=321, intermediate_size=128)
    path = write_gguf(hf, tmp_path / "l.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    ids = prompt(40, seed=1, vocab=321)
    load = dict(device="cpu", dtype="float32", prefill_chunk=16, packed=True)
    one = chatcore.load(path, **load)
    want_logits, want = one.logits(ids), _tokens(one, ids)
    with chatcore.load(path, tensor_parallel=2, **load) as tp:
        assert isinstance(tp.model.runner.model.layers[0].w_down, PackedWeight)
        torch.testing.assert_close(tp.logits(ids), want_logits, rtol=1e-4, atol=1e-4)
        assert _tokens(tp, ids) == want
    bad = write_gguf(model_factory.make_llama_dir(tmp_path / "b"), tmp_path / "b.gguf",
                     qtype=gguf.GGMLQuantizationType.Q8_0)   # MLP width 160: halves of 80 cut 32-column blocks
    with pytest.raises(ChatcoreError, match=r"would cut \S*down_proj\S* \(q8_0\) inside a 32-column block"):
        chatcore.load(bad, tensor_parallel=2, **load)
