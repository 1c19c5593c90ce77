"""Tensor parallel on the CPU (gloo): TP=2 and TP=4 against the same model in one process (TP=1).

A Llama model with GQA (4 query heads, 2 KV heads: TP=4 replicates KV heads) and a BLOOM model (ALiBi,
12 heads: not a power of two, so each rank's slopes are an uneven slice), both with a vocabulary of 321 (not
a multiple of 2 or 4: the last rank's rows are padded); BLOOM's biases are random, so a row-parallel bias must
be added exactly once. Gemma 3 at TP=4 too (sliding-window layers with their own RoPE base, sandwich norms,
soft-capped logits, 2 KV heads replicated). One scenario per engine: logits of a 40-token
prompt in chunks of 16, greedy tokens in a slot, a second turn reusing the slot, a span dropped from the
slot's middle (context shift) and a turn after it, and a 48-token slot shifted by attention sinks while it
generates. Errors: sizes that do not split the model, missing GPUs, a rank killed, a rank stuck.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from model_factory import make_bloom_dir, make_gemma3_dir, make_llama_dir, randomize_biases

import chatcore
from chatcore import SamplingParams
from chatcore.cli import main as cli_main
from chatcore.config import ModelConfig
from chatcore.errors import DeviceUnavailable, RankFailed, TensorParallelError
from chatcore.models.base import CausalLM, CausalModel
from chatcore.parallel.shard import RankShard, check_divides, valid_sizes

VOCAB = 321
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
LOAD = dict(device="cpu", dtype="float32", prefill_chunk=16)


def ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n,), generator=g).tolist()


def tokens(events: list) -> list[int]:  # noqa: ANN001
    return [ev.token_id for ev in events]


def scenario(engine: chatcore.Engine) -> dict[str, object]:
    prompt = ids(40, seed=1)
    out: dict[str, object] = {"logits": engine.logits(prompt)}
    slot = engine.new_slot()
    out["first"] = tokens(list(engine.generate(prompt, GREEDY, slot=slot)))
    events = list(engine.generate(prompt + out["first"] + ids(8, seed=2), GREEDY, slot=slot))
    out["second"], out["second_cached"] = tokens(events), events[-1].stats.cached_tokens
    slot.drop(4, 20)   # the context manager's "shift" mode: a span out of the middle, the rest moved back
    events = list(engine.generate(list(slot.tokens) + ids(6, seed=3), GREEDY, slot=slot))
    out["after_drop"], out["after_drop_cached"] = tokens(events), events[-1].stats.cached_tokens
    out["drop_logits"] = engine.prefill(ids(3, seed=5), slot, all_logits=True).float()
    small = engine.new_slot(48)
    events = list(engine.generate(prompt, dataclasses.replace(GREEDY, max_new_tokens=16), slot=small, sink_tokens=4))
    out["sinks"], out["discarded"] = tokens(events), events[-1].stats.discarded_tokens
    out["sink_logits"] = engine.prefill(ids(3, seed=4), small, all_logits=True).float()
    return out


def assert_same(ours: dict[str, object], ref: dict[str, object]) -> None:
    for key, want in ref.items():
        got = ours[key]
        if isinstance(want, torch.Tensor):
            diff = (got - want).abs().max().item()
            assert diff <= 1e-4, f"{key}: max |logit difference| {diff:.3g} > 1e-4"
        else:
            assert got == want, f"{key}: {got} != {want}"
    assert ref["second_cached"] == 40 + 8 - 1 and ref["after_drop_cached"] > 0 and ref["discarded"] > 0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, object]]]:
    root = tmp_path_factory.mktemp("tp")
    dirs = {"llama": make_llama_dir(root / "llama", vocab_size=VOCAB),
            "bloom": randomize_biases(make_bloom_dir(root / "bloom", vocab_size=VOCAB, hidden_size=48, n_head=12)),
            "gemma3": make_gemma3_dir(root / "gemma3", vocab_size=VOCAB)}
    return {name: (path, scenario(chatcore.load(path, **LOAD))) for name, path in dirs.items()}


@pytest.mark.parametrize(("family", "n"), [("llama", 2), ("llama", 4), ("bloom", 2), ("bloom", 4), ("gemma3", 4)])
def test_matches_one_process(models: dict, family: str, n: int) -> None:
    path, ref = models[family]
    with chatcore.load(path, tensor_parallel=n, **LOAD) as engine:
        assert len(engine.model.workers.procs) == n - 1
        assert isinstance(engine.model, CausalModel) and not isinstance(engine.model, CausalLM)
        assert_same(scenario(engine), ref)


def test_rank_killed_closes_the_engine(models: dict) -> None:
    path, ref = models["llama"]
    calls: list[tuple[int, int]] = []
    engine = chatcore.load(path, tensor_parallel=2, progress=lambda done, total: calls.append((done, total)), **LOAD)
    assert calls[-1] == (len(calls), len(calls)) == (3 + 9 * 3, 30)   # rank 0 reported each of its tensors
    slot = engine.new_slot()
    assert tokens(list(engine.generate(ids(40, seed=1), GREEDY, slot=slot))) == ref["first"]
    worker = engine.model.workers.procs[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    t0 = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 exited \(killed by signal 9\)"):
        list(engine.generate(ids(12, seed=5), GREEDY, slot=slot))
    assert time.monotonic() - t0 < 60   # hang bound: seen from the pipe, not after the 120 s collective timeout
    with pytest.raises(RankFailed, match="engine is closed"):
        engine.logits([3, 4, 5])
    engine.close()


def test_rank_stuck_times_out(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATCORE_TP_TIMEOUT", "3")
    path, _ = models["llama"]
    engine = chatcore.load(path, tensor_parallel=2, **LOAD)
    worker = engine.model.workers.procs[0]
    os.kill(worker.pid, signal.SIGSTOP)   # alive but not answering: rank 0's collective must time out
    try:
        t0 = time.monotonic()
        with pytest.raises(RankFailed, match="waited past its timeout"):
            engine.logits(ids(8, seed=6))
        assert time.monotonic() - t0 < 60   # hang bound: the 3 s timeout applied, not the default 120 s
        assert worker.poll() is not None, "the stuck rank was not stopped"
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)
        engine.close()


# -- sizes that cannot split the model: refused before any process starts --------------------------------------
def test_sizes_that_do_not_divide_are_refused(models: dict) -> None:
    path, _ = models["llama"]
    with pytest.raises(TensorParallelError, match="does not divide the model's 4 attention heads; use one of 1, 2, 4"):
        chatcore.load(path, tensor_parallel=3, **LOAD)
    with pytest.raises(TensorParallelError, match="at least 1"):
        chatcore.load(path, tensor_parallel=0, **LOAD)
    cfg = ModelConfig(family="llama", vocab_size=100, hidden_size=96, intermediate_size=256, num_layers=1,
                      num_heads=12, num_kv_heads=4, head_dim=8, max_position_embeddings=64)
    with pytest.raises(TensorParallelError, match="4 key/value heads"):
        check_divides(cfg, 3)   # 12 heads split in 3, but 4 KV heads cannot be
    with pytest.raises(TensorParallelError, match="MLP width of 256"):
        check_divides(dataclasses.replace(cfg, num_kv_heads=6), 3)
    assert valid_sizes(cfg) == [1, 2, 4]


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs")
def test_fewer_gpus_than_ranks(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = models["llama"]
    if not torch.cuda.is_available():  # no GPU at all: the device itself is refused first
        with pytest.raises(DeviceUnavailable, match="'cuda' is not available"):
            chatcore.load(path, tensor_parallel=2, device="cuda")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # one GPU pretended (nothing reaches it)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(TensorParallelError, match=r"needs 2 GPUs \(cuda:0..cuda:1\) but \d+ are visible"):
        chatcore.load(path, tensor_parallel=2, device="cuda")


def test_cli_reports_a_bad_size_in_one_line(models: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = models["llama"]
    assert cli_main(["generate", "--model", str(path), "--prompt", "hi", "--tensor-parallel", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("chatcore: error: tensor_parallel=3 does not divide") and "\n" not in err


def test_rank_shard_replicates_kv_heads() -> None:
    """Llama-3.1-70B's 64 query / 8 KV heads at TP=16: each KV head serves two ranks, each rank its own."""
    cfg = ModelConfig(family="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=1,
                      num_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=64)
    shards = [RankShard(cfg, 16, r) for r in range(16)]
    assert [s.kv_heads for s in shards] == [(r // 2, r // 2 + 1) for r in range(16)]
    assert [s.heads for s in shards][:2] == [(0, 4), (4, 8)]
    assert RankShard(cfg, 4, 3).kv_heads == (6, 8) and RankShard(cfg, 4, 3).columns == (21504, 28672)
    local = RankShard(cfg, 16, 15).local_config()
    assert (local.num_heads, local.num_kv_heads, local.vocab_size) == (4, 1, 8016)
    assert RankShard(cfg, 16, 15).vocab == (120240, 128256)


@pytest.mark.slow
def test_bench_runs_its_cpu_path(tmp_path: Path) -> None:
    """bench/tp.py is for multi-GPU machines; its CPU path (gloo, tiny shape) runs the same code here."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, str(root / "bench" / "tp.py"), "--device", "cpu", "--tiny", "--tp", "1", "2",
                    "--new", "6", "--out", str(tmp_path)], check=True, env=env, capture_output=True, timeout=120)
    runs = json.loads((tmp_path / "tp.json").read_text())["runs"]
    assert [r["tp"] for r in runs] == [1, 2]
    assert all(r["decode_tok_s"] > 0 and r["roofline_fraction"] > 0 for r in runs)
    assert runs[1]["all_reduce_us"] > 0 and runs[1]["step_bytes_per_gpu"] < runs[0]["step_bytes_per_gpu"]
    assert (tmp_path / "tp.png").stat().st_size > 0


def test_the_window_cap_counts_each_ranks_share() -> None:
    """fit_window per rank: its KV heads' cache and its part of the weights in its own free memory; all ranks
    serve the smallest window any of them holds, and the notice names that rank."""
    from chatcore.checkpoint import fit_window
    from chatcore.parallel import window as tp_window

    cfg = ModelConfig(family="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                      num_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=131072)
    local = [RankShard(cfg, 8, r).local_config() for r in range(8)]
    gpus = [torch.device("cuda", r) for r in range(8)]
    gib = 2**30
    # 140 GiB free on each GPU: the whole model's weights alone would not fit, each rank's share does
    assert fit_window(cfg, gpus[0], torch.bfloat16, 131072, 140 * gib)[0] < 131072
    assert tp_window.rank_windows(local, torch.bfloat16, 131072, [140 * gib] * 8, gpus) == (131072, None)
    # one GPU with little free: its share sets the window of every rank, and the notice says which rank
    frees = [140 * gib] * 8
    frees[5] = 20 * gib
    window, notice = tp_window.rank_windows(local, torch.bfloat16, 131072, frees, gpus)
    assert window == fit_window(local[5], gpus[5], torch.bfloat16, 131072, 20 * gib)[0] < 131072
    assert notice is not None and "tensor_parallel=8, rank 5" in notice and f"the window is {window} tokens" in notice
    assert "max_seq_len" in notice and "\n" not in notice
    # unknown free memory: no cap
    assert tp_window.rank_windows(local, torch.bfloat16, 131072, [None] * 8, gpus) == (131072, None)


def test_ranks_on_the_cpu_share_the_hosts_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatcore.checkpoint import LoadOptions, fit_window
    from chatcore.parallel import window as tp_window
    from chatcore.parallel.spec import LaunchSpec

    monkeypatch.setattr(tp_window, "free_memory", lambda dev: 8 * 2**30)
    assert tp_window.rank_free(torch.device("cpu"), 4) == 2 * 2**30
    assert tp_window.rank_free(torch.device("cuda", 1), 4) == 8 * 2**30
    cfg = ModelConfig(family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=32768)
    spec = LaunchSpec(path="x", world=4, device_type="cpu", device_index=0, dtype="float32", options=LoadOptions(),
                      store_port=0, timeout_s=10)
    local = [RankShard(cfg, 4, r).local_config() for r in range(4)]
    window, notice = tp_window.agree_window(spec, 0, local, torch.float32, 32768)  # no process group: this rank's
    assert window == fit_window(local[0], torch.device("cpu"), torch.float32, 32768, 2 * 2**30)[0] < 32768
    assert notice is not None and "its share of the host's memory" in notice


def test_the_window_cap_counts_packed_weights_and_the_kv_dtype() -> None:
    """A 70B shape in int4 (groups of 64) over 8 GPUs with 8 GiB free each: a rank's packed share of every
    projection is its shape's packed size to the byte, and with an int8 cache ((D + 4) bytes per head and
    token) the window is what those bytes leave; counted in bf16 the weights alone would not fit."""
    from chatcore.checkpoint import WINDOW_SHARE, fit_window
    from chatcore.models import FAMILIES
    from chatcore.parallel import window as tp_window
    from chatcore.quant.quantize import quantized_nbytes

    cfg = ModelConfig(family="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                      num_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=131072)
    whole = FAMILIES["llama"].shapes(cfg)

    def packed(name: str) -> bool:
        return len(whole[name]) == 2 and name != "model.embed_tokens.weight"

    class Served:   # every 2-D tensor but the embedding served int4-packed, as quantize="int4" does
        def shape(self, name: str) -> tuple[int, ...]:
            return whole[name]

        def packed_nbytes(self, name: str) -> int | None:
            return quantized_nbytes(whole[name], "int4", 64) if packed(name) else None  # type: ignore[arg-type]

    local = [RankShard(cfg, 8, r).local_config() for r in range(8)]
    gpus = [torch.device("cuda", r) for r in range(8)]
    share = tp_window.RankWeights(Served(), local[3])   # type: ignore[arg-type]
    mine = FAMILIES["llama"].shapes(local[3])
    weights = 0
    for name, shape in mine.items():
        want = quantized_nbytes(shape, "int4", 64) if packed(name) else None  # type: ignore[arg-type]
        assert share.packed_nbytes(name) == want, name
        weights += want if want is not None else 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
    assert 4.5e9 < weights < 5.5e9                                        # ~4.5 bits of 70B / 8, the embedding
    free = 8 * 2**30
    per_token = 2 * 80 * 1 * (128 + 4) + 2 * 128 * (4 + 2)               # one KV head a rank; RoPE tables
    want_window = int((free - weights) * WINDOW_SHARE) // per_token // 256 * 256
    assert 65536 < want_window < 131072
    window, notice = tp_window.rank_windows(local, torch.bfloat16, 131072, [free] * 8, gpus, Served(), "int8")
    assert window == want_window and notice is not None and f"weights {weights / 2**30:.1f} GiB" in notice
    bf16_kv = tp_window.rank_windows(local, torch.bfloat16, 131072, [free] * 8, gpus, Served())[0]
    assert bf16_kv == int((free - weights) * WINDOW_SHARE) // (per_token + 2 * 80 * (128 - 4)) // 256 * 256
    assert tp_window.rank_windows(local, torch.bfloat16, 131072, [free] * 8, gpus)[0] == 512   # bf16 weights
    assert fit_window(local[3], gpus[3], torch.bfloat16, 131072, free, source=share, kv_dtype="int8")[0] == window


def test_a_ranks_packed_share_is_the_bytes_its_shards_take(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize="int4" on a real (tiny) checkpoint, two ranks: what the window cap counts for a rank's weights
    is what the shards it loads take, byte for byte (the lm_head's padded vocab rows included); agree_window
    counts them and the spec's kv_dtype."""
    from chatcore.checkpoint import LoadOptions, fit_window, open_checkpoint, serve_source, weight_bytes
    from chatcore.parallel import window as tp_window
    from chatcore.parallel.shard import reader, shard_tensor
    from chatcore.parallel.spec import LaunchSpec
    from chatcore.quant.packed import PackedWeight

    path = make_llama_dir(tmp_path / "llama", vocab_size=VOCAB, intermediate_size=128)
    cfg, plain, _ = open_checkpoint(path)
    options = LoadOptions(quantize="int4", quant_group=32, kv_dtype="fp8")
    served = serve_source(plain, cfg, torch.device("cpu"), options)
    local = [RankShard(cfg, 2, r).local_config() for r in range(2)]
    for r in range(2):
        plan, taken = RankShard(cfg, 2, r), 0
        for name in plain.names():
            part = shard_tensor(plan, cfg.family, name, reader(served))
            got = served.get(name) if part is None else part
            taken += got.nbytes() if isinstance(got, PackedWeight) else got.numel() * 4
        assert weight_bytes(local[r], torch.float32, tp_window.RankWeights(served, local[r])) == taken
    monkeypatch.setattr(tp_window, "free_memory", lambda dev: 2 * 2**20)
    spec = LaunchSpec(path=str(path), world=2, device_type="cpu", device_index=0, dtype="float32", options=options,
                      store_port=0, timeout_s=10)
    window, _ = tp_window.agree_window(spec, 0, local, torch.float32, 4096, served)
    share = tp_window.RankWeights(served, local[0])
    assert window == fit_window(local[0], torch.device("cpu"), torch.float32, 4096, 2**20, source=share,
                                kv_dtype="fp8")[0]
    assert 512 < window < 4096
    assert window > tp_window.agree_window(spec, 0, local, torch.float32, 4096)[0]      # the weights as float32
