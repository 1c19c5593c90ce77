"""A worker rank (1 .. N-1): ``python -m chatcore.parallel.worker CMD_FD REPLY_FD``, started by rank 0.

It reads a :class:`LaunchSpec` from its command pipe, says hello, joins the process group, loads its shard,
says ready, then runs rank 0's ops in order (each ``(op, *args)`` one :class:`ShardRunner` method, the same
one rank 0 runs; ``("free", slot, ...)`` first when rank 0 let slots go) until rank 0 says ``("close",)``
or goes away (end of the pipe).

Its weights, slots and the results of its forward passes stay here; only the collectives connect it to
the other ranks. On an error it sends ``("error", rank, message)`` and exits, which the other ranks see as a
peer leaving.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection

import torch

from chatcore.errors import ChatcoreError
from chatcore.parallel.comm import join, leave
from chatcore.parallel.runner import ShardRunner
from chatcore.parallel.shard import load_shard


def serve(runner: ShardRunner, cmd: Connection) -> None:
    """Run rank 0's ops until it says close."""
    while True:
        op, *args = cmd.recv()
        if op == "close":
            return
        getattr(runner, op)(*args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = Connection(int(argv[0]), writable=False)
    reply = Connection(int(argv[1]), readable=False)
    rank = -1
    try:
        # rank 0 decides when this rank ends: a terminal's Ctrl-C reaches rank 0, which stops the workers itself
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        spec, rank = cmd.recv()
        if spec.device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
        reply.send(("hello", rank))
        join(spec, rank)
        runner = ShardRunner(load_shard(spec, rank))
        reply.send(("ready", rank))
        serve(runner, cmd)
        leave()
        return 0
    except EOFError:
        return 0   # rank 0 closed its end: it finished, or it is gone
    except BaseException as exc:   # every failure is reported to rank 0 before this rank exits
        if not isinstance(exc, (ChatcoreError, RuntimeError, KeyboardInterrupt)):
            traceback.print_exc()
        with contextlib.suppress(OSError):
            reply.send(("error", rank, f"{type(exc).__name__}: {exc}".splitlines()[0][:500]))
        return 1


if __name__ == "__main__":
    code = main()
    # exit at once: a failed rank must not wait in torch.distributed's teardown for peers that may be gone
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
