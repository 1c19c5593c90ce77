"""Which Hugging Face tensors ``quantize=`` turns into packed weights: the 2-D projections (attention q/k/v/o,
fused qkv, MLP gate/up/down and each family's equivalents) and an untied output head. Embeddings, norms and
biases stay float. The family's tensor-parallel ``split_rules`` already name its projections by suffix (every
column- or row-parallel split is one), so this reads them rather than keeping a second list per family."""

from __future__ import annotations

from collections.abc import Iterable

# splits of chatcore.parallel.shard.shard_tensor that only projections take ("vocab": embeddings and the head)
PROJECTION_SPLITS = frozenset({"q", "kv", "head3", "qkv", "out", "up", "down"})
HEAD = "lm_head.weight"


def split_of(split_rules: Iterable[tuple[str, str]], name: str) -> str | None:
    """The split of ``name`` under a family's ``split_rules`` (the first matching suffix; None: replicated)."""
    return next((kind for suffix, kind in split_rules if name.endswith(suffix)), None)


def is_projection(split_rules: Iterable[tuple[str, str]], name: str) -> bool:
    """Whether ``name`` is a projection's weight matrix (not its bias) or the untied output head."""
    if name == HEAD:
        return True
    return name.endswith(".weight") and split_of(split_rules, name) in PROJECTION_SPLITS


def quantized_names(split_rules: Iterable[tuple[str, str]], names: Iterable[str]) -> list[str]:
    """The tensors of ``names`` that ``quantize=`` packs, in their order."""
    rules = tuple(split_rules)
    return [n for n in names if is_projection(rules, n)]
