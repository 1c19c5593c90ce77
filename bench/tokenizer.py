"""Encoding speed of the tiktoken backend against the ``tiktoken`` package, on about 100 KB of text (this
repository's own Python and Markdown files, no repeats: code and prose) and on hard cases.

    python bench/tokenizer.py [--encoding cl100k_base] [--repeat 5]

Rank data comes from tests/tiktoken_data.py (npm ``tiktoken@1.0.22``, cached). "cold" is the first encode of
a fresh tokenizer (empty piece cache), "warm" the best of ``--repeat`` more; tiktoken's time is its best.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tiktoken_data import encoding  # noqa: E402

from chatcore.tokenizer.bpe import read_ranks  # noqa: E402
from chatcore.tokenizer.tiktoken_bpe import PATTERNS, TiktokenTokenizer  # noqa: E402


def corpus(size: int = 100_000) -> str:
    parts, total = [], 0
    for path in sorted([*ROOT.glob("chatcore/**/*.py"), *ROOT.glob("context/**/*.py"), *ROOT.glob("*.md")]):
        text = path.read_text(encoding="utf-8")
        parts.append(text)
        total += len(text.encode("utf-8"))
        if total >= size:
            break
    return "".join(parts).encode("utf-8")[:size].decode("utf-8", errors="ignore")


def best(fn, repeat: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoding", default="cl100k_base")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    enc = encoding(args.encoding)
    ranks = read_ranks(enc.rank_file)
    ref = enc.reference()
    cases = {"100 KB code+prose": corpus(), "100 KB one word": "x" * 100_000,
             "100 KB multilingual": ("naïve café 日本語のテキスト 한국어 😀 Straße 1234567 " * 2000)[:100_000]}
    print(f"{args.encoding}: ours (cold / warm) vs tiktoken {getattr(sys.modules.get('tiktoken'), '__version__', '')}")
    for name, text in cases.items():
        ours = TiktokenTokenizer(ranks, enc.special_tokens, pattern=PATTERNS[args.encoding])
        start = time.perf_counter()
        ids = ours.encode(text)
        cold = time.perf_counter() - start
        warm = best(lambda t=text, o=ours: o.encode(t), args.repeat)
        theirs = best(lambda t=text: ref.encode(t, disallowed_special=()), args.repeat)
        assert ids == ref.encode(text, disallowed_special=()), name
        mb = len(text.encode("utf-8")) / 1e6
        print(f"  {name:22s} {len(ids):6d} tokens  ours {cold * 1e3:6.1f} / {warm * 1e3:6.1f} ms "
              f"({mb / cold:5.2f} / {mb / warm:5.2f} MB/s)  tiktoken {theirs * 1e3:6.1f} ms ({mb / theirs:5.2f} MB/s)")


if __name__ == "__main__":
    main()
