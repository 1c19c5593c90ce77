"""The ``chatcore`` command line.

Generation commands live here; ``sessions`` (storage/), ``chat`` (tui/), ``serve`` and ``replay`` (context/)
are dispatched by module name, so the generation core never imports the layers built on top of it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from chatcore.errors import ChatcoreError

if TYPE_CHECKING:
    from chatcore.engine import Engine
    from chatcore.sampling import SamplingParams

# Subcommands implemented by the other top-level packages: name -> (module, help).
_EXTERNAL = {
    "chat": ("tui.app", "the terminal chat UI"),
    "replay": ("context.replay", "replay recorded multi-turn conversations as regression tests"),
    "serve": ("context.server.cli", "an OpenAI-compatible HTTP server with stateful conversations"),
    "sessions": ("storage.cli", "list, show, export, import and delete stored chat sessions"),
}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="demo",
                   help="model directory, .gguf file, or 'demo' (SmolLM2-135M-Instruct, fetched on first use)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: best available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: by device)")
    p.add_argument("--max-seq-len", type=int, default=None, help="context window to use (default: the model's)")
    packing = p.add_mutually_exclusive_group()
    packing.add_argument("--dequantize", dest="packed", action="store_const", const=False, default=None,
                         help="dequantize a quantized GGUF to --dtype (the default on the CPU; on CUDA the "
                              "Q4_0..Q8_0 / Q4_K / Q5_K / Q6_K tensors stay packed)")
    packing.add_argument("--packed", dest="packed", action="store_const", const=True,
                         help="keep a quantized GGUF packed on any device (on the CPU: less memory, slower)")
    p.add_argument("--quantize", choices=("int8", "int4", "fp8"), default=None,
                   help="quantize a float checkpoint's projections on load (weight-only; fp8 needs an Ada / "
                        "Hopper GPU or the CPU)")
    p.add_argument("--quant-group", type=int, choices=(32, 64, 128), default=64,
                   help="columns per int4 scale and min (default 64)")
    p.add_argument("--kv-dtype", choices=("int8", "fp8"), default=None,
                   help="store the KV cache quantized (default: in --dtype)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="chatcore", description="A long-context chat engine for local language models.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="stream the reply to one chat turn to stdout")
    _add_model_args(g)
    g.add_argument("--prompt", "-p", required=True, help="the user's message ('-' reads it from stdin)")
    g.add_argument("--system", "-s", default=None, help="system prompt")
    g.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    g.add_argument("--max-new-tokens", "-n", type=int, default=256)
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stats", action="store_true", help="print token counts and speed to stderr at the end")
    g.add_argument("--tensor-parallel", "--tp", type=int, default=1, metavar="N",
                   help="split the model over N ranks (processes; on CUDA N GPUs from --device's index)")

    c = sub.add_parser("convert", help="write a GGUF model out as a Hugging Face safetensors directory")
    c.add_argument("model", help="a .gguf file, or 'demo'")
    c.add_argument("out", help="output directory (created)")

    for name, (_, text) in _EXTERNAL.items():
        sub.add_parser(name, help=text, add_help=False)
    return ap


def _generate(args: argparse.Namespace) -> int:
    import chatcore

    try:
        params = chatcore.SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop))
    except ValueError as exc:
        raise ChatcoreError(str(exc)) from None
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        where = "on stdin" if args.prompt == "-" else "with --prompt"
        raise ChatcoreError(f"the prompt is empty; give the message {where}")
    engine = chatcore.load(args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                           tensor_parallel=args.tensor_parallel, packed=args.packed, quantize=args.quantize,
                           quant_group=args.quant_group, kv_dtype=args.kv_dtype)
    with engine:
        return _stream(engine, args, prompt, params)


def _stream(engine: Engine, args: argparse.Namespace, prompt: str, params: SamplingParams) -> int:
    tok = engine.require_tokenizer()
    if args.raw:
        ids = tok.encode(prompt, add_bos=True)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    stats = None
    for ev in engine.generate(ids, params):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        stats = ev.stats
    sys.stdout.write("\n")
    if args.stats and stats is not None:
        print(f"[{stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated, "
              f"ttft {stats.ttft_s * 1000:.0f} ms, {stats.decode_tokens_per_s:.1f} tok/s, "
              f"finish: {stats.finish_reason}]", file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from chatcore.convert import gguf_to_hf_dir
    from chatcore.loader import resolve

    out = gguf_to_hf_dir(resolve(args.model), args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status. A reader that stops reading stdout (``chatcore ... | head``) ends it
    quietly: no "Broken pipe", no traceback, status 0 unless the command had already chosen another."""
    code = 0
    try:
        code = _main(argv)
        sys.stdout.flush()  # a pipe closed under the last buffered output fails here, not at exit
    except BrokenPipeError:
        drop_stdout()
    return code


def drop_stdout() -> None:
    """Point stdout at /dev/null, so nothing written or flushed after its reader went away raises again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _EXTERNAL:
        module = importlib.import_module(_EXTERNAL[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    try:
        return {"generate": _generate, "convert": _convert}[args.command](args)
    except ChatcoreError as exc:
        print(f"chatcore: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nchatcore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
