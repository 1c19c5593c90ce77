"""A random-weight chat model for load tests where no real weights can travel (the GPU machine): a Llama of a
named shape with the demo model's tokenizer and chat template, bf16 safetensors.

Usage: python bench/gpu_runs/random_chat_model.py TOKENIZER_DIR OUT_DIR [--shape llama-3.2-1b]

TOKENIZER_DIR holds tokenizer.json / tokenizer_config.json (e.g. from ``chatcore.convert.gguf_to_hf_dir`` of
the demo GGUF). The rows of the output head for the special tokens below id 3 (end of text, start and end of a
turn) are zeroed: with random weights a greedy reply then never ends early, so every reply runs to its token
limit (a load test's replies all have the same length) and none is empty.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent
sys.path.append(str(BENCH))
from batch import SHAPES  # noqa: E402  (the shapes bench/batch.py measures)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tokenizer_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(json.loads((args.tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    shape = {k: v for k, v in SHAPES[args.shape].items() if k != "rope_scaling"}   # plain RoPE over 8k
    shape.update(vocab_size=vocab, max_position_embeddings=8192, tie_word_embeddings=False)   # an own head
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, **shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight[:3] = 0
    model.save_pretrained(args.out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(args.tokenizer_dir / name, args.out / name)
    print(f"{args.shape} with a {vocab}-token vocabulary: {args.out}")


if __name__ == "__main__":
    main()
