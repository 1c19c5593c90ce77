"""Batched decode: aggregate tokens/s against the number of concurrent streams, chatcore's ``BatchEngine``
against transformers' continuous batching, same random weights, same prompts, same run.

Usage (GPU machine): python bench/batch.py --out DIR [--models llama-3.1-8b llama-3.2-1b]
    [--streams 1 4 16 32 64] [--prompt 512] [--new 128] [--deadline SECONDS]
CPU smoke run (here): python bench/batch.py --device cpu --models tiny --out bench

For each model (bf16 random weights at the real shape on the GPU, float32 on the CPU; transformers builds
them from its config class and chatcore's model reads the very same tensors) and each stream count N:
N threads each submit one prompt of ``--prompt`` fixed random token ids at once and take ``--new`` greedy
tokens (EOS ignored) through ``BatchEngine(engine, BatchConfig(...)).generate(ids, params, slot=...)``; then
the same N prompts go to transformers' continuous batching manager (``init_continuous_batching`` +
``add_request``, one manager per model kept across N; ``generate_batch`` is a wrapper around the same). Per
round (``load_stats.aggregate``): aggregate tokens/s end to end, the steady decode tokens/s (while every stream
decodes), per-stream decode tokens/s and time to first token (p50 / p95). Every round uses prompts no earlier
round used, so no prefix cache helps either engine; each engine runs one unmeasured round at N first
(CUDA graphs, allocator). Also: chatcore's single-stream ``Engine.generate`` (the CUDA-graph loop) as the
single-stream reference, and whether chatcore's batched greedy tokens of stream 0 equal that engine's.
Roofline at N (``load_stats.roofline``): a decode step reads the weights once plus every stream's live KV
(prompt + half the reply on average) at the device copy bandwidth measured in the run, and cannot compute
faster than a large matmul measured in the run. Ratios: against chatcore at one stream, against the
single-stream engine, against transformers at the same N.
Results go to DIR/batch.json (DIR/batch_cpu.json on the CPU) as they come, a plot next to it; rounds
that would start after ``--deadline`` seconds are skipped (recorded as such).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import math
import statistics
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
# this folder goes after the packages (python puts it first): bench/storage.py must not hide `storage`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
from load_stats import Trace, aggregate, check_batch_json, roofline, step_cost  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=32, vocab_size=8192, tie_word_embeddings=False,
                 rope_theta=10000.0, max_position_embeddings=4096),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling=dict(LLAMA3_ROPE, factor=32.0)),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=500000.0, max_position_embeddings=131072, rope_scaling=LLAMA3_ROPE),
}


# -- the machine -----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large copy, read + write counted (2 GiB on a GPU, 256 MiB on the CPU)."""
    n = (512 if device.type == "cuda" else 64) * 1024 * 1024
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    return 2 * n * 4 / timed(lambda: dst.copy_(src), device, reps=10 if device.type == "cuda" else 5)


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of one large square matmul in ``dtype`` (8192 on a GPU, 1024 on the CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, reps=10 if device.type == "cuda" else 3)


# -- the models --------------------------------------------------------------------------------------------------
def build_hf(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[name], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def build_engine(hf: torch.nn.Module, device: torch.device, dtype: torch.dtype, window: int, backend: str,
                 prefill_chunk: int):  # noqa: ANN201 - chatcore.Engine, imported late
    from chatcore.checkpoint_config import config_from_hf
    from chatcore.engine import Engine
    from chatcore.layers.attention import pick_backend
    from chatcore.models import FAMILIES
    from chatcore.runtime import Runtime

    cfg = config_from_hf(hf.config.to_dict())
    backend = pick_backend(backend, device, dtype)
    state = hf.state_dict()
    runtime = Runtime(device=device, dtype=dtype, max_seq_len=window, prefill_chunk=prefill_chunk,
                      attention_backend=backend)
    model = FAMILIES[cfg.family](cfg, runtime, lambda n: state[n], backend)
    return Engine(model, cfg, runtime, tokenizer=None, source="random")


def cost_of(hf: torch.nn.Module, dtype: torch.dtype) -> Any:
    c = hf.config
    size = torch.tensor([], dtype=dtype).element_size()
    return step_cost(layers=c.num_hidden_layers, hidden=c.hidden_size, intermediate=c.intermediate_size,
                     heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                     vocab=c.vocab_size, tied=c.tie_word_embeddings, bytes_per_weight=size, bytes_per_kv=size)


def prompts(n: int, length: int, vocab: int, tag: str) -> list[list[int]]:
    """``n`` fixed random prompts, distinct for every ``tag`` (a round never shares a prefix with another)."""
    seed = zlib.crc32(tag.encode())
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# -- chatcore --------------------------------------------------------------------------------------------------
def batch_engine(engine: Any, max_batch: int, kv_memory: int, block_size: int | None,
                 prefill_chunk: int | None, decode_ahead: bool | None = None) -> Any:
    """``BatchEngine(engine, BatchConfig(...))`` with the options this BatchConfig has."""
    import chatcore
    from chatcore.batch.engine import BatchConfig

    fields = {f.name for f in dataclasses.fields(BatchConfig)}
    wanted = {"max_batch": max_batch, "kv_memory": kv_memory, "block_size": block_size,
              "prefill_chunk": prefill_chunk, "decode_ahead": decode_ahead}
    return chatcore.BatchEngine(engine, BatchConfig(**{k: v for k, v in wanted.items()
                                                       if k in fields and v is not None}))


class LockedEngine:
    """A plain Engine behind one lock: how N callers shared one engine before BatchEngine (``--chatcore
    locked``; a baseline, and a stand-in while BatchEngine is not there)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.lock = threading.Lock()

    def new_slot(self, capacity: int | None = None) -> Any:
        return self.engine.new_slot(capacity)

    def generate(self, ids: Sequence[int], params: Any, *, slot: Any = None) -> Any:
        with self.lock:
            yield from self.engine.generate(ids, params, slot=slot)

    def close(self) -> None:
        pass


def run_chatcore(target: Any, batch: list[list[int]], new: int, capacity: int) -> tuple[list[Trace], list[int]]:
    """One round: a thread per prompt, all released at once; returns each stream's trace and stream 0's tokens."""
    import chatcore

    params = chatcore.SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True)
    traces = [Trace(submit=0.0) for _ in batch]
    first: list[int] = []
    gate = threading.Barrier(len(batch))

    def stream(i: int) -> None:
        tr = traces[i]
        slot = None
        try:
            slot = target.new_slot(capacity)
            gate.wait(timeout=120)
            tr.submit = time.perf_counter()
            for ev in target.generate(batch[i], params, slot=slot):
                tr.tokens.append(time.perf_counter())
                if i == 0:
                    first.append(ev.token_id)
        except Exception as exc:  # noqa: BLE001 - a failed stream is counted, the round goes on
            tr.error = f"{type(exc).__name__}: {str(exc)[:300]}"
            gate.abort()   # streams still at the gate fail too (BrokenBarrierError) rather than wait forever
        finally:
            if slot is not None and hasattr(slot, "reset"):
                slot.reset()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(len(batch))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return traces, first


def single_stream(engine: Any, ids: list[int], new: int, reps: int = 3) -> tuple[dict[str, Any], list[int]]:
    """chatcore's Engine.generate on one prompt (the single-stream decode loop), best of ``reps`` after a
    warm-up: its stats and tokens."""
    import chatcore

    params = chatcore.SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True)
    slot = engine.new_slot(len(ids) + new + 1)
    list(engine.generate(ids, params, slot=slot))   # warm-up (and the slot's CUDA graph)
    runs = []
    for _ in range(reps):
        slot.reset()
        t0 = time.perf_counter()
        evs = list(engine.generate(ids, params, slot=slot))
        runs.append((evs[-1].stats, time.perf_counter() - t0, [ev.token_id for ev in evs]))
    stats, wall, tokens = max(runs, key=lambda r: r[0].decode_tokens_per_s)
    return {"decode_tokens_per_s": stats.decode_tokens_per_s, "ttft_s": stats.ttft_s, "wall_s": wall,
            "tokens": stats.generated_tokens, "runs": [r[0].decode_tokens_per_s for r in runs]}, tokens


# -- transformers --------------------------------------------------------------------------------------------------
def _accepted(fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


class TransformersPeer:
    """transformers' continuous batching manager for one model, started once, fed one round at a time.

    Works with the manager API of transformers 5.x: ``init_continuous_batching(generation_config=...,
    continuous_batching_config=...)``, ``start``, ``add_request(ids, max_new_tokens=..., record_timestamps=...)``,
    ``get_result``, ``stop``; options a version lacks are left out (found with ``inspect``). Token times come from
    ``record_timestamps`` where the version has it, else from streamed outputs as they arrive."""

    def __init__(self, hf: torch.nn.Module, new: int, cb_options: dict[str, Any]) -> None:
        from transformers import GenerationConfig

        self.hf = hf
        gen = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
        kwargs: dict[str, Any] = {"generation_config": gen}
        cb_cls = _cb_config_class()
        if cb_cls is not None:
            fields = {f.name for f in dataclasses.fields(cb_cls)}
            opts = dict(cb_options)
            if "page_size" in opts and "page_size" not in fields:
                opts["block_size"] = opts.pop("page_size")
            cb = cb_cls(**{k: v for k, v in opts.items() if k in fields})
            kwargs["continuous_batching_config"] = cb
        self.options = {k: v for k, v in cb_options.items()}
        self.manager = hf.init_continuous_batching(**_accepted(hf.init_continuous_batching, **kwargs))
        add = inspect.signature(self.manager.add_request).parameters
        self.timestamps = "record_timestamps" in add
        t0 = time.perf_counter()
        if hasattr(self.manager, "warmup"):
            self.manager.warmup()
        self.manager.start()
        self.start_s = time.perf_counter() - t0
        self.attn = getattr(hf.config, "_attn_implementation", None)

    def describe(self) -> dict[str, Any]:
        cfg = getattr(self.manager, "continuous_batching_config", None)
        out: dict[str, Any] = {"attn_implementation": getattr(self.hf.config, "_attn_implementation", None),
                               "record_timestamps": self.timestamps, "warmup_and_start_s": self.start_s,
                               "options": self.options}
        if cfg is not None:
            for k in ("use_cuda_graph", "use_async_batching", "max_batch_tokens", "num_blocks", "page_size",
                      "block_size", "max_blocks_per_request", "scheduler_type"):
                if hasattr(cfg, k):
                    v = getattr(cfg, k)
                    out[k] = list(v) if isinstance(v, tuple) else v
        return out

    def run(self, batch: list[list[int]], new: int, timeout: float) -> tuple[list[Trace], list[int]]:
        traces: dict[str, Trace] = {}
        order: list[str] = []
        kw = {"record_timestamps": True} if self.timestamps else {"streaming": True}
        for ids in batch:
            submit = time.perf_counter()
            rid = self.manager.add_request(ids, max_new_tokens=new, **kw)
            traces[rid] = Trace(submit=submit)
            order.append(rid)
        done: dict[str, Any] = {}
        end = time.perf_counter() + timeout
        while len(done) < len(batch) and time.perf_counter() < end:
            out = self.manager.get_result(timeout=1.0)
            if out is None:
                if hasattr(self.manager, "is_running") and not self.manager.is_running():
                    break
                continue
            tr = traces.get(out.request_id)
            if tr is None:
                continue
            if not self.timestamps:   # streaming: one output per new token (possibly several at once)
                now = time.perf_counter()
                tr.tokens.extend([now] * (len(out.generated_tokens) - len(tr.tokens)))
            if out.is_finished():
                done[out.request_id] = out
        for rid in order:
            tr, out = traces[rid], done.get(rid)
            if out is None:
                tr.error = "no result before the timeout"
            elif getattr(out, "error", None):
                tr.error = str(out.error)[:300]
            elif self.timestamps:
                tr.tokens = list(out.timestamps or [])
        first = list(done[order[0]].generated_tokens) if order[0] in done else []
        return [traces[r] for r in order], first

    def close(self) -> None:
        self.manager.stop(block=True, timeout=30)
        if hasattr(self.manager, "destroy"):
            self.manager.destroy()


def _cb_config_class() -> Any:
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        try:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig
        except ImportError:
            return None
    return ContinuousBatchingConfig


# -- one model ---------------------------------------------------------------------------------------------------
def measure_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                  machine: dict[str, float], m: dict[str, Any], save: Callable[[], None], left: Callable[[], float]
                  ) -> None:
    print(f"== {name}", flush=True)
    hf = build_hf(name, device, dtype)
    vocab = hf.config.vocab_size
    cost = cost_of(hf, dtype)
    m.update(weight_bytes=cost.weight_bytes, kv_bytes_per_token=cost.kv_bytes_per_token,
             flops_per_token=cost.flops_per_token, prompt_tokens=args.prompt, new_tokens=args.new)
    max_n = max(args.streams)
    seq = args.prompt + args.new + 1
    engine = build_engine(hf, device, dtype, seq + 64, args.backend, args.prefill_chunk or min(args.prompt, 4096))
    m["backend"] = engine.runtime.attention_backend

    single, _ = single_stream(engine, prompts(1, args.prompt, vocab, f"{name}/single")[0], args.new)
    m["engine_single_stream"] = single
    print(f"  Engine single stream: decode {single['decode_tokens_per_s']:.1f} tok/s, "
          f"ttft {single['ttft_s'] * 1e3:.1f} ms", flush=True)

    block = args.block_size or 256
    kv_memory = int(max_n * math.ceil(seq / block + 1) * block * cost.kv_bytes_per_token * 1.25)
    m["kv_memory_bytes"] = kv_memory
    target = (batch_engine(engine, max_n, kv_memory, args.block_size, args.prefill_chunk,
                           False if args.no_ahead else None)
              if args.chatcore == "batch" else LockedEngine(engine))
    m["chatcore_engine"] = type(target).__name__
    save()

    # One engine at a time: transformers' manager runs a thread of its own once started, so it starts only
    # after every chatcore round (and chatcore's pool is closed before it).
    ref_slot = None
    tokens: dict[int, list[int]] = {}
    for n in args.streams:
        row = m.setdefault("streams", {}).setdefault(str(n), {})
        row["roofline"] = roofline(cost, n, args.prompt + args.new / 2, machine["bandwidth"], machine["flops"])
        batch = prompts(n, args.prompt, vocab, f"{name}/{n}")
        sch = getattr(target, "scheduler", None)
        counts = (sch.steps, sch.ahead_steps) if sch is not None else None
        if not run_one(row, n, "chatcore", lambda b, k: run_chatcore(target, b, k, seq), name, batch, args,
                       vocab, tokens, left):
            continue
        if counts is not None and "error" not in row["chatcore"]:   # both rounds (warm-up and measured)
            row["chatcore"]["steps"] = sch.steps - counts[0]
            row["chatcore"]["steps_queued_ahead"] = sch.ahead_steps - counts[1]
        step_s = graph_step_time(target, n)
        if step_s is not None and "decode_tokens_per_s" in row["chatcore"]:
            # the device's time for a step of n rows against the observed one: the rest is host work the
            # device waited for
            row["chatcore"]["graph_step_s"] = step_s
            row["chatcore"]["host_share_of_step"] = 1 - step_s * row["chatcore"]["decode_tokens_per_s"] / n
        if tokens.get(n) and not args.no_check and left() > 0:
            # batched greedy tokens of stream 0 against the single-stream engine on the same prompt
            ref_slot = ref_slot or engine.new_slot(seq)
            ref = single_stream_tokens(engine, ref_slot, batch[0], args.new)
            row["stream0_common_prefix_with_engine"] = common_prefix(tokens[n], ref)
            row["stream0_identical_to_engine"] = tokens[n] == ref
            if tokens[n] != ref:
                d = row["stream0_divergence"] = divergence(engine, batch[0], ref, tokens[n])
                print(f"  x{n:<3} stream 0 leaves the engine's tokens at {d['position']}: engine logits there "
                      f"{d.get('logit_gap', 0):.4f} apart (top-2 gap {d.get('top2_gap', 0):.4f}, spread "
                      f"{d.get('logit_std', 0):.3f})", flush=True)
            else:
                print(f"  x{n:<3} stream 0 equals the engine's {len(ref)} tokens", flush=True)
        derive(m, n)
        save()
    if hasattr(target, "close"):
        target.close()
    ref_slot = None
    peer = None if args.no_hf else start_peer(hf, args, device, max_n, seq, m)
    save()
    if peer is None:
        return
    theirs: dict[int, list[int]] = {}
    for n in args.streams:
        row = m["streams"][str(n)]
        run_one(row, n, "transformers", lambda b, k: peer.run(b, k, timeout=max(60.0, left())), name,
                prompts(n, args.prompt, vocab, f"{name}/{n}"), args, vocab, theirs, left)
        if tokens.get(n) and theirs.get(n):
            row["stream0_common_prefix_with_transformers"] = common_prefix(tokens[n], theirs[n])
        derive(m, n)
        save()
    peer.close()


def graph_step_time(target: Any, n: int, reps: int = 20) -> float | None:
    """Seconds of one replay of the decode graph the round's last step used (n rows: every stream ends on the
    same step), timed on the device alone, in the step thread between rounds. Replaying it rewrites the same
    keys and values at the same positions, so nothing changes. None without batched decode graphs."""
    graphs = getattr(getattr(target, "runner", None), "graphs", None)
    if graphs is None or not graphs.takes(n) or graphs.bucket(n) not in graphs.graphs:
        return None
    graph = graphs.graphs[graphs.bucket(n)][0]
    if graph is None:
        return None
    return float(target.scheduler.call(lambda: replay_seconds(graph, reps)))


def replay_seconds(graph: torch.cuda.CUDAGraph, reps: int = 20) -> float:
    """Device seconds of one replay of ``graph`` (after one unmeasured replay), between CUDA events."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def run_one(row: dict[str, Any], n: int, key: str, run: Callable[[list[list[int]], int], tuple[list[Trace], list[int]]],
            name: str, batch: list[list[int]], args: argparse.Namespace, vocab: int, tokens: dict[int, list[int]],
            left: Callable[[], float]) -> bool:
    """One engine's warm-up and measured round at ``n`` streams into ``row[key]`` (skipped past the deadline);
    stream 0's tokens into ``tokens[n]``. Returns whether it ran."""
    if left() <= 0:
        row[key] = {"skipped": "deadline"}
        print(f"  x{n:<3} {key}: skipped (deadline)", flush=True)
        return False
    again = [prompts(n, args.prompt, vocab, f"{name}/{n}/again{i}") for i in range(1, args.repeat)]
    row[key], tokens[n] = measure_round(run, prompts(n, args.prompt, vocab, f"{name}/{n}/warm/{key}"),
                                        [batch, *again], args)
    report(n, key, row[key])
    return True


def start_peer(hf: torch.nn.Module, args: argparse.Namespace, device: torch.device, max_n: int, seq: int,
               m: dict[str, Any]) -> TransformersPeer | None:
    if device.type == "cpu":   # sized to the work (by default it sizes its cache from free memory)
        opts: dict[str, Any] = {"num_blocks": max_n * math.ceil(seq / 32 + 1), "page_size": 32,
                                "max_batch_tokens": args.prefill_chunk or args.prompt}
    else:   # the KV memory chatcore's pool has (in its default 256-token pages), within a share of what is free
        opts = {"num_blocks": math.ceil(m["kv_memory_bytes"] / (256 * m["kv_bytes_per_token"])),
                "max_memory_percent": args.hf_memory}
    try:
        peer = TransformersPeer(hf, args.new, opts)
    except Exception as exc:  # noqa: BLE001 - record why the peer could not start
        m["transformers"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(f"  transformers failed to start: {exc}", flush=True)
        return None
    m["transformers"] = peer.describe()
    print(f"  transformers: {m['transformers']}", flush=True)
    return peer


def measure_round(run: Callable[[list[list[int]], int], tuple[list[Trace], list[int]]], warm: list[list[int]],
                  batches: list[list[list[int]]], args: argparse.Namespace) -> tuple[dict[str, Any], list[int]]:
    """One unmeasured round on ``warm``, then a measured one on each of ``batches`` (fresh prompts each): the
    aggregate of the fastest (its decode tok/s; every round's in ``decode_tokens_per_s_rounds``) and stream 0's
    tokens of the first batch (the one checked against the single-stream engine)."""
    try:
        run(warm, args.warm or args.new)
        rounds = [run(batch, args.new) for batch in batches]
    except Exception as exc:  # noqa: BLE001 - record the failure, go on with the next engine
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}, []
    results = [aggregate(traces, args.new) for traces, _ in rounds]
    best = max(range(len(results)), key=lambda i: results[i].get("decode_tokens_per_s", 0.0))
    res, tokens = results[best], rounds[0][1]
    if len(results) > 1:
        res["decode_tokens_per_s_rounds"] = [r.get("decode_tokens_per_s", 0.0) for r in results]
    res["stream0_tokens"] = tokens[:16]
    errs = [t.error for r in rounds for t in r[0] if t.error]
    if errs:
        res["first_error"] = errs[0]
    return res, tokens


def report(n: int, key: str, res: dict[str, Any]) -> None:
    if "error" in res:
        print(f"  x{n:<3} {key}: failed: {res['error']}", flush=True)
        return
    ttft = res.get("ttft_s", {})
    per_stream = res.get("per_stream_decode_tokens_per_s", {}).get("p50", 0)
    print(f"  x{n:<3} {key:<12} decode {res.get('decode_tokens_per_s', 0):9.1f} tok/s  end-to-end "
          f"{res.get('tokens_per_s', 0):9.1f}  per-stream {per_stream:7.1f}"
          f"  ttft p50/p95 {ttft.get('p50', 0) * 1e3:7.1f} / {ttft.get('p95', 0) * 1e3:7.1f} ms"
          f"  complete {res['complete']}", flush=True)


def single_stream_tokens(engine: Any, slot: Any, ids: list[int], new: int) -> list[int]:
    """Greedy tokens of the single-stream Engine for ``ids`` (``slot`` emptied first)."""
    import chatcore

    params = chatcore.SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True)
    slot.reset()
    return [ev.token_id for ev in engine.generate(ids, params, slot=slot)]


def divergence(engine: Any, prompt: list[int], ref: list[int], ours: list[int]) -> dict[str, Any]:
    """Where stream 0's batched tokens leave the single-stream engine's: the engine's own logits there (a
    prefill of the prompt and the shared prefix) for both tokens. A gap far below the logits' spread is a tie
    that rounding (bf16, another summation order in a batched GEMM) may break either way."""
    p = common_prefix(ref, ours)
    if p >= min(len(ref), len(ours)):
        return {"position": p, "lengths": [len(ref), len(ours)]}
    logits = engine.logits([*prompt, *ref[:p]])[-1]
    top = torch.topk(logits, 2).values
    return {"position": p, "engine_token": ref[p], "batch_token": ours[p],
            "logit_gap": float(logits[ref[p]] - logits[ours[p]]), "top2_gap": float(top[0] - top[1]),
            "batch_token_rank": int((logits > logits[ours[p]]).sum()), "logit_std": float(logits.std())}


def derive(m: dict[str, Any], n: int) -> None:
    """Ratios and roofline fractions of the row at ``n`` streams."""
    rows = m["streams"]
    row = rows[str(n)]
    ours = row.get("chatcore", {}).get("decode_tokens_per_s")
    theirs = row.get("transformers", {}).get("decode_tokens_per_s")
    roof = row["roofline"]["tokens_per_s"]
    one = rows.get("1", {}).get("chatcore", {}).get("decode_tokens_per_s")
    single = m.get("engine_single_stream", {}).get("decode_tokens_per_s")
    if ours:
        row["chatcore"]["fraction_of_roofline"] = ours / roof
        if one:
            row["chatcore"]["speedup_vs_chatcore_1_stream"] = ours / one
        if single:
            row["chatcore"]["speedup_vs_engine_single_stream"] = ours / single
        if theirs:
            row["chatcore"]["speedup_vs_transformers"] = ours / theirs
    if theirs:
        row["transformers"]["fraction_of_roofline"] = theirs / roof
        hf_one = rows.get("1", {}).get("transformers", {}).get("decode_tokens_per_s")
        if hf_one:
            row["transformers"]["speedup_vs_transformers_1_stream"] = theirs / hf_one


# -- output --------------------------------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for col, name in enumerate(models):
        m = results["models"][name]
        ns = sorted(int(n) for n in m.get("streams", {}))
        top, bottom = axes[0][col], axes[1][col]
        for key, style, color in (("chatcore", "o-", "tab:blue"), ("transformers", "s-", "tab:orange")):
            pts = [(n, m["streams"][str(n)].get(key, {})) for n in ns]
            pts = [(n, r) for n, r in pts if "decode_tokens_per_s" in r]
            if not pts:
                continue
            xs = [n for n, _ in pts]
            top.plot(xs, [r["decode_tokens_per_s"] for _, r in pts], style, color=color, label=key)
            bottom.plot(xs, [r["ttft_s"]["p50"] * 1e3 for _, r in pts], style, color=color, label=f"{key} p50")
            bottom.plot(xs, [r["ttft_s"]["p95"] * 1e3 for _, r in pts], style.replace("-", "--"), color=color,
                        alpha=0.5, label=f"{key} p95")
        top.plot(ns, [m["streams"][str(n)]["roofline"]["tokens_per_s"] for n in ns], "k--", label="roofline")
        single = m.get("engine_single_stream", {}).get("decode_tokens_per_s")
        if single:
            top.axhline(single, color="gray", lw=0.8, ls=":", label="Engine, one stream")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.set_xlabel("concurrent streams")
            ax.legend(fontsize=7)
        top.set_yscale("log")
        top.set_ylabel("aggregate decode tokens/s")
        top.set_title(f"{name} ({results['device']}, {m.get('prompt_tokens')}+{m.get('new_tokens')} tokens)")
        bottom.set_ylabel("time to first token, ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: dict[str, Any]) -> None:
    print("\nmodel          N   chatcore tok/s  roof%  xN=1  xEngine  transformers tok/s  roof%  ours/theirs"
          "  host%  ttft p50/p95 ms (ours | theirs)")
    for name, m in results["models"].items():
        for n, row in sorted(m.get("streams", {}).items(), key=lambda kv: int(kv[0])):
            c, t = row.get("chatcore", {}), row.get("transformers", {})
            ct, tt = c.get("ttft_s", {}), t.get("ttft_s", {})
            print(f"{name:<14} {n:>3} {c.get('decode_tokens_per_s', 0):14.1f}"
                  f" {100 * c.get('fraction_of_roofline', 0):5.1f} {c.get('speedup_vs_chatcore_1_stream', 0):5.2f}"
                  f" {c.get('speedup_vs_engine_single_stream', 0):7.2f} {t.get('decode_tokens_per_s', 0):19.1f}"
                  f" {100 * t.get('fraction_of_roofline', 0):5.1f} {c.get('speedup_vs_transformers', 0):11.2f}"
                  f"  {100 * c.get('host_share_of_step', 0):5.1f}"
                  f"  {ct.get('p50', 0) * 1e3:.0f}/{ct.get('p95', 0) * 1e3:.0f}"
                  f" | {tt.get('p50', 0) * 1e3:.0f}/{tt.get('p95', 0) * 1e3:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=None, help="default: llama-3.1-8b llama-3.2-1b (tiny on the CPU)")
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 4, 16, 32, 64])
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens per stream (512; 128 on the CPU)")
    ap.add_argument("--new", type=int, default=None, help="new tokens per stream (128; 32 on the CPU)")
    ap.add_argument("--warm", type=int, default=0, help="new tokens of the unmeasured round (default: --new)")
    ap.add_argument("--backend", default="auto", help="chatcore attention backend")
    ap.add_argument("--block-size", type=int, default=None, help="BatchConfig.block_size (default: its own)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="BatchConfig.prefill_chunk (default: its own)")
    ap.add_argument("--chatcore", choices=["batch", "locked"], default="batch",
                    help="batch: BatchEngine; locked: one Engine behind a lock (the pre-batching baseline)")
    ap.add_argument("--hf-memory", type=float, default=0.5,
                    help="GPU: transformers' max_memory_percent for its KV cache (of the memory free then)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--no-ahead", action="store_true",
                    help="BatchConfig(decode_ahead=False): every step read before the next is queued")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measured rounds per engine and stream count (fresh prompts each); the fastest is kept")
    ap.add_argument("--no-check", action="store_true", help="skip the batched-vs-single token check")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds; later rounds are skipped")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on the CPU (default 1: steadier on shared cores; 0: torch's default)")
    args = ap.parse_args()
    start = time.perf_counter()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if cpu and args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if cpu else torch.bfloat16
    args.models = args.models or (["tiny"] if cpu else ["llama-3.1-8b", "llama-3.2-1b"])
    args.prompt = args.prompt or (128 if cpu else 512)
    args.new = args.new or (32 if cpu else 128)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "batch_cpu" if cpu else "batch"
    json_path = args.out / f"{stem}.json"
    results: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}
    import transformers

    results.update(device=torch.cuda.get_device_name(device) if not cpu else f"cpu ({torch.get_num_threads()} threads)",
                   torch=torch.__version__, transformers=transformers.__version__,
                   args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    machine = {"bandwidth": copy_bandwidth(device), "flops": matmul_flops(device, dtype)}
    results.update(bandwidth_gbs=machine["bandwidth"] / 1e9, matmul_tflops=machine["flops"] / 1e12)
    print(f"copy bandwidth {machine['bandwidth'] / 1e9:.1f} GB/s, matmul {machine['flops'] / 1e12:.2f} TFLOP/s",
          flush=True)
    models = results.setdefault("models", {})

    def save() -> None:
        json_path.write_text(json.dumps(results, indent=1))

    def left() -> float:
        return args.deadline - (time.perf_counter() - start)

    for name in args.models:
        models[name] = {}
        measure_model(name, args, device, dtype, machine, models[name], save, left)
        gc.collect()
        if not cpu:
            torch.cuda.empty_cache()
    results["elapsed_s"] = time.perf_counter() - start
    problems = check_batch_json(results)
    if problems:
        results["schema_problems"] = problems
    save()
    plot(results, args.out / f"{stem}.png")
    print_table(results)
    print(f"\n{json_path} ({results['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
