"""How far apart int4 quantizers of one group size land on a real model: perplexity, mean KL and top-1 agreement
(``quant_accuracy.py``'s scoring) and the projections' relative Frobenius error, for ``--quantize int4`` as it is
(``search``), round-to-nearest alone (``rtn``) and the same search run on the weights times (1 + 1e-3 noise), its
codes then taken for the weights themselves (``jitter``: another draw of the same quantizer at the same error).

Usage: python bench/int4_spread.py [--model gemma3|demo] [--tokens 2048] [--groups 64,128] [--kinds search,rtn,jitter]

Bench-only: ``rtn`` and ``jitter`` replace ``chatcore.quant.quantize._int4_groups`` while their model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import chatcore
from chatcore.checkpoint import open_checkpoint
from chatcore.models import FAMILIES
from chatcore.quant import quantize as qz
from chatcore.quant.names import quantized_names
from chatcore.quant.packed import dequantize

sys.path.insert(0, str(Path(__file__).parent))
import quant_accuracy as qa  # noqa: E402

Groups = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
SEARCH = qz._int4_groups


def rtn(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = qz._f16_down(g.amin(dim=-1, keepdim=True))
    d = qz._f16_up((g.amax(dim=-1, keepdim=True) - m.float()) / 15)
    return qz._codes(g, d, m), d, m


def jitter(seed: int) -> Groups:
    gen = torch.Generator().manual_seed(seed)

    def groups(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, d, m = SEARCH(g * (1 + 1e-3 * torch.randn(g.shape, generator=gen)))
        return qz._codes(g, d, m), d, m
    return groups


@contextlib.contextmanager
def quantizer(groups: Groups) -> Iterator[None]:
    qz._int4_groups = groups
    try:
        yield
    finally:
        qz._int4_groups = SEARCH


def rel_error(src: Path, group: int) -> float:
    """sqrt(sum of squared int4 errors / sum of squared weights) over every projection ``quantize=`` packs."""
    cfg, tensors, _ = open_checkpoint(src)
    fam = FAMILIES[cfg.family]
    err = ref = 0.0
    for name in quantized_names(fam.split_rules, fam.tensor_names(cfg)):
        w = tensors.get(name).float()
        v = dequantize(qz.quantize(w, "int4", qz.fit_group(w.shape[1], group)))
        err, ref = err + float((v - w).square().sum()), ref + float(w.square().sum())
    return (err / ref) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3", choices=("gemma3", "demo"))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--groups", default="64,128")
    ap.add_argument("--kinds", default="search,rtn,jitter")
    args = ap.parse_args()
    src = qa.gemma3_path() if args.model == "gemma3" else qa.ensure_demo_model()
    quiet = {"status": lambda _m: None, "progress": lambda _d, _t: None}
    ref = chatcore.load(src, device="cpu", dtype="float32", max_seq_len=args.tokens, **quiet)
    ids = qa.text_ids(ref, args.tokens)
    ref_stats, ref_lp = qa.score(ref, ids, None)
    del ref
    gc.collect()
    print(json.dumps({"model": args.model, "reference": ref_stats}), flush=True)
    floats = qa.float_dir(src)
    for group in map(int, args.groups.split(",")):
        for kind in args.kinds.split(","):
            groups = {"search": SEARCH, "rtn": rtn, "jitter": jitter(group)}[kind]
            with quantizer(groups):
                frob = rel_error(src, group)
            with quantizer(groups):        # jitter: a later draw than rel_error's, at the same error level
                engine = chatcore.load(floats, device="cpu", dtype="float32", max_seq_len=args.tokens,
                                       quantize="int4", quant_group=group, **quiet)
            stats, _ = qa.score(engine, ids, ref_lp)
            del engine
            gc.collect()
            print(json.dumps({"group": group, "kind": kind, "rel_frobenius": round(frob, 5)}
                             | {k: round(v, 4) for k, v in stats.items()}), flush=True)


if __name__ == "__main__":
    main()
