"""Conversation replay: recorded multi-turn conversations through the context manager and the engine,
deterministically, as regression tests.

    chatcore replay convs.jsonl --window 2048 --report out.jsonl --golden golden.jsonl

    from context.replay import replay
    run = replay("convs.jsonl", engine, window=2048, max_new_tokens=32)
    run.conversation("trip").turn(-1).reply

See README ("Conversation replay") for the input format, the report and the `--policy` syntax.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chatcore.errors import ChatcoreError

from .api import ReplayRun, UnknownConversation, replay, select
from .formats import InputError, RecordedConversation, ReplayMessage, load_file, parse_lines
from .golden import compare
from .policy import PolicyError, parse_policy
from .runner import MODES, ConversationResult, Replayer, ReplayOptions, TurnResult, prompt_hash

__all__ = ["MODES", "ConversationResult", "InputError", "RecordedConversation", "ReplayMessage", "ReplayOptions",
           "ReplayRun", "Replayer", "TurnResult", "UnknownConversation", "compare", "load_file", "main", "parse_lines",
           "prompt_hash", "replay"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="chatcore replay",
        description="Replay recorded conversations (JSONL, one per line, OpenAI-style or ShareGPT) through the "
                    "context manager and the model, turn by turn, and report what the model saw each turn.")
    ap.add_argument("file", help="JSONL file of conversations")
    ap.add_argument("--model", "-m", default="demo", help="model directory, .gguf file, or 'demo' (default)")
    ap.add_argument("--window", type=int, default=None, help="context window in tokens (default: the model's)")
    ap.add_argument("--policy", action="append", default=[], metavar="KEY=VALUE[,...]",
                    help="context options, e.g. high=0.8,low=0.5 kv=shift layout=pinned-last summarize=on "
                         "reserve=128, or @file.json (repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (used with --temperature > 0)")
    ap.add_argument("--forced", action="store_true",
                    help="keep the recorded assistant replies; the model only scores them")
    ap.add_argument("--plan-only", action="store_true",
                    help="like --forced, but do not run the model at all (plans and prompt hashes only)")
    ap.add_argument("--max-new-tokens", "-n", type=int, default=64, help="reply length limit (default 64)")
    ap.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--conversation", "-c", action="append", default=[], metavar="ID",
                    help="replay only this conversation (repeatable)")
    ap.add_argument("--report", metavar="OUT.jsonl", help="write the per-turn report here")
    ap.add_argument("--no-timing", action="store_true", help="leave timing fields out of --report")
    ap.add_argument("--golden", metavar="GOLDEN.jsonl", help="compare with this report; exit 1 on a difference")
    ap.add_argument("--update-golden", action="store_true", help="(re)write the --golden file from this replay")
    ap.add_argument("--plot", metavar="OUT.png", help="plot prompt tokens and time to first token per turn")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    ap.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: by device)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (reports are reproducible for one thread count; default: torch's)")
    ap.add_argument("--quiet", "-q", action="store_true", help="no per-turn progress on stderr")
    return ap


def _err(msg: str) -> None:
    print(f"chatcore replay: error: {msg}", file=sys.stderr)


def _load(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    from chatcore.loader import open_checkpoint, resolve

    if mode == "plan":
        cfg, _, tok = open_checkpoint(resolve(args.model))
        if tok is None:
            raise ChatcoreError(f"{args.model} has no tokenizer; replay needs one")
        return {"tokenizer": tok, "engine_window": cfg.max_position_embeddings, "model": resolve(args.model)}
    import torch

    import chatcore

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = chatcore.load(args.model, device=args.device, dtype=args.dtype)
    engine.require_tokenizer()
    return {"engine": engine}


def _progress(t: TurnResult) -> None:
    kept = f"{t.kept[0]}-{t.kept[-1]}" if t.kept else "-"
    extra = f", dropped {len(t.dropped)}" if t.dropped else ""
    print(f"  {t.conversation} turn {t.turn}: {t.tokens}/{t.budget} tokens, kept turns {kept}{extra}, "
          f"cache hit {t.cache_hit_tokens}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.update_golden and not args.golden:
        _err("--update-golden needs --golden GOLDEN.jsonl (the file to write)")
        return 2
    if args.threads is not None and args.threads < 1:
        _err(f"--threads must be at least 1, got {args.threads} (leave it out for torch's default)")
        return 2
    mode = "plan" if args.plan_only else ("forced" if args.forced else "generate")
    try:
        policy = parse_policy(args.policy)
        from .policy import context_config

        context_config(policy, args.window, args.max_new_tokens)  # check it before loading a model
        if not Path(args.file).is_file():
            _err(f"{args.file}: no such file")
            return 2
        if args.golden and not args.update_golden and not Path(args.golden).is_file():
            _err(f"golden file {args.golden} does not exist; create it with --update-golden")
            return 2
        if args.conversation:  # a name the file lacks fails before a model loads
            select(*load_file(args.file), args.conversation, args.file)
        loaded = _load(args, mode)
        model_window = loaded["engine"].window if "engine" in loaded else loaded["engine_window"]
        if args.window is not None and args.window > model_window:  # the context manager cuts it to the model's
            print(f"chatcore replay: --window {args.window} is above the model's window of {model_window} "
                  f"tokens; using {model_window}", file=sys.stderr)
        run = replay(Path(args.file), mode=mode, window=args.window, policy=policy, seed=args.seed,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, only=args.conversation,
                     on_turn=None if args.quiet else _progress, **loaded)
    except (PolicyError, ValueError) as exc:
        _err(str(exc))
        return 2
    except ChatcoreError as exc:
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        print("\nchatcore replay: interrupted", file=sys.stderr)
        return 130
    return _finish(args, run)


def _finish(args: argparse.Namespace, run: ReplayRun) -> int:
    from .golden import check, update
    from .report import plot, summary_table, write_report

    status = 0
    for e in run.input_errors:
        _err(str(e))
        status = 1
    for r in run.results:
        if r.error is not None:
            _err(f"{args.file}:{r.line}: conversation {r.conversation}: {r.error}")
            status = 1
    recs = run.records
    sys.stdout.write(summary_table(recs))
    if args.report:
        write_report(args.report, recs, timing=not args.no_timing)
        print(f"report: {args.report}", file=sys.stderr)
    if args.plot:
        plot(recs, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.golden:
        if args.update_golden:
            update(recs, args.golden)
            print(f"golden: wrote {args.golden}", file=sys.stderr)
        else:
            diff = check(recs, args.golden)
            if diff:
                sys.stdout.write("\n".join(diff) + "\n")
                status = 1
            else:
                print(f"golden: matches {args.golden}", file=sys.stderr)
    return status
