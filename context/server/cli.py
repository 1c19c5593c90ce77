"""`chatcore serve`: the OpenAI-compatible HTTP server (loopback by default)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

ENV_KEY = "CHATCORE_API_KEY"


def parse_args(argv: list[str]) -> argparse.Namespace:
    from chatcore.cli import _add_model_args

    ap = argparse.ArgumentParser(prog="chatcore serve",
                                 description="An OpenAI-compatible HTTP server with stateful conversations.")
    _add_model_args(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                        "only; 0.0.0.0 for every interface)")
    ap.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one, printed)")
    ap.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${ENV_KEY}; "
                                                    "unset: no key)")
    ap.add_argument("--redis-url", default=None, help="Redis URL (default: $REDIS_URL, else the embedded Redis)")
    ap.add_argument("--served-model-name", default=None,
                    help="the model id clients send and /v1/models lists (default: from --model)")
    ap.add_argument("--summarize", action="store_true",
                    help='with truncation "auto", summarize dropped turns instead of only dropping them')
    ap.add_argument("--summary-tokens", type=int, default=200, metavar="N",
                    help="the longest summary --summarize writes, in tokens (default 200)")
    ap.add_argument("--slot-memory", type=float, default=4.0, metavar="GIB",
                    help="KV cache kept between turns for conversations, in GiB (least recently used freed "
                         "first; default 4)")
    ap.add_argument("--max-batch", type=int, default=32,
                    help="generations decoded together at most (more wait their turn; default 32)")
    ap.add_argument("--kv-memory", type=float, default=None, metavar="GIB",
                    help="paged KV memory all generations share, in GiB (default: 70%% of the free GPU memory; "
                         "512 MiB on the CPU)")
    ap.add_argument("--no-batch", dest="batch", action="store_false",
                    help="generate one request at a time on the plain engine (no batching)")
    ap.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    return ap.parse_args(argv)


def model_name(model: str) -> str:
    """The id a model is served under by default: 'demo', or the directory / file name without its suffix."""
    if model in ("", "demo"):
        return "demo"
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else (p.name or str(p))


def _listen(host: str, port: int) -> socket.socket:
    from chatcore.errors import ChatcoreError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ChatcoreError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") \
            from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    import chatcore
    import storage

    from ..layout import ContextConfig
    from .app import create_app
    from .backend import serving_engine
    from .state import ServerConfig, ServerState

    key = args.api_key if args.api_key is not None else os.environ.get(ENV_KEY) or None
    config = ServerConfig(model_name=args.served_model_name or model_name(args.model), api_key=key,
                          context=ContextConfig(summarize=args.summarize, summary_max_tokens=args.summary_tokens),
                          slot_memory=int(args.slot_memory * (1 << 30)))
    if key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"chatcore serve: warning: listening on {args.host} without an API key: anyone who can reach it "
              "can read and write every stored conversation (set --api-key or CHATCORE_API_KEY)", file=sys.stderr)
    sock = _listen(args.host, args.port)
    store = storage.open_store(args.redis_url)
    engine = chatcore.load(args.model or "demo", device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                           packed=args.packed, quantize=args.quantize, quant_group=args.quant_group,
                           kv_dtype=args.kv_dtype, status=lambda m: print(f"chatcore serve: {m}", file=sys.stderr))
    served = serving_engine(engine, batch=args.batch, max_batch=args.max_batch,
                            kv_memory=int(args.kv_memory * (1 << 30)) if args.kv_memory is not None else None)
    state = ServerState(served, store, config)
    app = create_app(state)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    batching = f"up to {args.max_batch} generations batched" if args.batch else "one generation at a time"
    print(f"chatcore serve: {config.model_name} on http://{shown}:{port}/v1 ({batching}; storage: {store.where}"
          f"{'; API key required' if key else ''})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5,
                                           lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        state.close()
        _close(served)
        store.close()
    return 0


def _close(engine: Any) -> None:
    try:
        engine.close()
    except Exception as exc:  # noqa: BLE001 - closing must not hide the exit status
        logging.getLogger("chatcore.serve").debug("closing the engine: %s", exc)


def main(argv: list[str] | None = None) -> int:
    from chatcore.errors import ChatcoreError

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        import storage  # noqa: F401 - its errors are caught below
        from storage import StorageError
    except ImportError as exc:  # pragma: no cover
        print(f"chatcore: error: {exc}", file=sys.stderr)
        return 1
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("chatcore: error: the server needs fastapi and uvicorn (pip install fastapi uvicorn)", file=sys.stderr)
        return 1
    try:
        return serve(args)
    except (ChatcoreError, StorageError, ValueError) as exc:
        print(f"chatcore: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
