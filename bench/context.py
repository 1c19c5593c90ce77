"""Context manager benchmark: planning time per turn vs history length; TTFT of turn 20 with KV reuse vs
re-prefilling the whole history (chatcore, and transformers on the same weights); cache hit rate.

Usage: python bench/context.py [--out bench/context.json] [--turns 20] [--threads N]

Planning uses the demo model's real tokenizer through its chat template (no weights), a window of 8,192
tokens and 512 reserved for the reply; histories of 10, 1,000 and 10,000 turns (two messages each, about
40-60 tokens per message). Each measured turn plans the new message (tokenizing it: the only tokenizer
work), commits the plan and appends the message and a reply. TTFT: the demo model (SmolLM2-135M, float32,
CPU) holds a 20-turn chat through ChatSession with an embedded Redis; turn 20's time to first token with
the session's reused KV slot is compared with a fresh slot (the whole prompt prefilled) and with
transformers (LlamaForCausalLM from the converted safetensors directory, one forward + first token).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ["apple", "river", "stone", "window", "garden", "letter", "music", "travel", "number", "silver",
         "paper", "engine", "morning", "planet", "yellow", "forest", "bridge", "candle", "market", "winter"]


def sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)) + f" ({i})."


def bench_planning(tokenizer: object, sizes: list[int], measured: int = 50) -> list[dict[str, object]]:
    from context import ContextConfig, ContextManager, Pending, TokenBudget

    class M:
        __slots__ = ("id", "role", "content")

        def __init__(self, id: str, role: str, content: str) -> None:
            self.id, self.role, self.content = id, role, content

    budget = TokenBudget(tokenizer)  # shared segment cache, as sessions of one engine share it
    out = []
    for n in sizes:
        m = ContextManager(budget, 8192, ContextConfig(window=8192, reply_reserve=512))
        m.set_system("You are a helpful assistant.")
        t0 = time.perf_counter()
        for i in range(n):
            m.append(M(f"u{n}-{i}", "user", sentence(i, 30)))
            m.append(M(f"a{n}-{i}", "assistant", sentence(i + 1, 40)))
        build_s = time.perf_counter() - t0
        m.commit(m.plan())
        times, prunes, tokens = [], 0, []
        for j in range(measured):
            text = sentence(n + j, 30)
            t = time.perf_counter()
            plan = m.plan([Pending("user", text)])
            times.append(time.perf_counter() - t)
            prunes += plan.pruned_now > 0
            tokens.append(plan.tokens)
            m.append(M(f"nu{n}-{j}", "user", text))
            m.commit(m.plan())
            m.append(M(f"na{n}-{j}", "assistant", sentence(n + j + 1, 40)))
        times.sort()
        out.append(dict(history_turns=n, history_build_s=round(build_s, 3), measured_turns=measured,
                        plan_ms_median=round(statistics.median(times) * 1e3, 4),
                        plan_ms_p95=round(times[int(0.95 * len(times)) - 1] * 1e3, 4),
                        plan_ms_max=round(times[-1] * 1e3, 4), prunings=prunes,
                        prompt_tokens_median=int(statistics.median(tokens))))
        print(out[-1], flush=True)
    return out


def bench_ttft(turns: int) -> dict[str, object]:
    import torch

    import chatcore
    from chatcore.convert import gguf_to_hf_dir
    from chatcore.demo import ensure_demo_model, home
    from chatcore.sampling import SamplingParams
    from context import ChatSession, ContextConfig
    from storage.connect import embedded_path, open_embedded

    gguf = ensure_demo_model()
    engine = chatcore.load(gguf, device="cpu", dtype="float32", max_seq_len=4096)
    store = open_embedded(embedded_path(Path(tempfile.mkdtemp(prefix="ctx-bench-"))))
    s = ChatSession.create(engine, store, system="You are a helpful assistant. Answer in one or two sentences.",
                           config=ContextConfig(window=4096, reply_reserve=256), max_new_tokens=32, temperature=0.0)
    reports = []
    questions = [f"Tell me one fact about the {w} and the number {i}." for i, w in enumerate(WORDS * 2)][:turns]
    for q in questions:
        reports.append(deque(s.send(q), maxlen=1)[0].report)
    last = reports[-1]
    plan_ids = s.manager.last.ids
    # the same turn with nothing cached (a fresh slot)
    fresh = []
    for _ in range(3):
        gen = engine.generate(plan_ids, SamplingParams(max_new_tokens=1), slot=engine.new_slot(4096))
        fresh.append(deque(gen, maxlen=1)[0].stats.ttft_s)
    # and through transformers on the same weights
    from transformers import LlamaForCausalLM

    hf_dir = home() / "bench" / "demo-hf"
    if not (hf_dir / "config.json").exists():
        gguf_to_hf_dir(gguf, hf_dir)
    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    x = torch.tensor([plan_ids])
    hf = []
    with torch.inference_mode():
        for _ in range(3):
            t = time.perf_counter()
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False)
            hf.append(time.perf_counter() - t)
    # cache reuse across turns 2..N: tokens reused out of tokens the slot could have held
    hit = sum(r.cache_hit_tokens for r in reports[1:])
    prompt = sum(r.tokens_used for r in reports[1:])
    store.close()
    return dict(
        turn=turns, prompt_tokens=last.tokens_used, turns_dropped=last.turns_dropped,
        ttft_reuse_s=round(last.ttft_s, 4), cache_hit_tokens=last.cache_hit_tokens, prefill_tokens=last.prefill_tokens,
        ttft_full_prefill_s=round(min(fresh), 4), ttft_transformers_s=round(min(hf), 4),
        speedup_vs_full=round(min(fresh) / last.ttft_s, 1), speedup_vs_transformers=round(min(hf) / last.ttft_s, 1),
        cache_hit_rate=round(hit / prompt, 4),
        new_tokens_per_turn_median=int(statistics.median(r.prefill_tokens for r in reports[1:])),
        per_turn=[dict(turn=i + 1, prompt=r.tokens_used, hit=r.cache_hit_tokens, prefill=r.prefill_tokens,
                       ttft_s=round(r.ttft_s, 4)) for i, r in enumerate(reports)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "context.json"))
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from chatcore.demo import ensure_demo_model
    from chatcore.loader import open_checkpoint

    tokenizer = open_checkpoint(ensure_demo_model())[2]
    result = dict(
        machine=dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
                     cpus=os.cpu_count(), load_avg=os.getloadavg()[0]),
        planning=bench_planning(tokenizer, [10, 1000, 10000]),
        ttft=bench_ttft(args.turns),
    )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result["ttft"].items() if k != "per_turn"}, indent=2))


if __name__ == "__main__":
    main()
