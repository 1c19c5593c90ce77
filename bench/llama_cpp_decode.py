"""llama.cpp's decode speed on a GGUF, for ``bench/cpu_decode.py``: run with a Python that has
``llama_cpp`` (llama-cpp-python), as ``python bench/llama_cpp_decode.py SPEC.json``; prints one JSON line.

SPEC: {"model": path, "threads": n, "new_tokens": n, "repeats": n, "prompts": {"128": [ids...], ...}}.
Per prompt: the prompt is evaluated (prefill, batch 512), then ``new_tokens`` greedy tokens are sampled, each
fed back through one ``eval``; decode speed is (N - 1) tokens over the time from the first sampled token to the
last, as chatcore's ``decode_tokens_per_s``; the median over ``repeats``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    longest = max(len(p) for p in spec["prompts"].values())
    llm = Llama(model_path=spec["model"], n_ctx=max(1024, longest + spec["new_tokens"] + 8), n_threads=spec["threads"],
                n_threads_batch=spec["threads"], n_batch=512, verbose=False)
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:   # the logits of the last token evaluated, straight from llama.cpp
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    out = {"llama_cpp_version": __import__("llama_cpp").__version__, "rows": {}}
    for n, ids in spec["prompts"].items():
        pre, dec = [], []
        for _ in range(spec["repeats"]):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            pre.append(len(ids) / (time.perf_counter() - t0))
            tok = last_argmax()
            t1 = time.perf_counter()
            for _ in range(spec["new_tokens"] - 1):
                llm.eval([tok])
                tok = last_argmax()
            dec.append((spec["new_tokens"] - 1) / (time.perf_counter() - t1))
        out["rows"][n] = {"prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
