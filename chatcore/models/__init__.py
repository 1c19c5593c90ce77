"""The model families by name: each is one file here defining ``FAMILY`` (a :class:`~chatcore.models.family.Family`)
next to its model class (the RoPE families share the Llama block)."""

from __future__ import annotations

from chatcore.models import bloom, gemma3, llama, mistral, mpt, qwen2, qwen3
from chatcore.models.family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY,
                                                   gemma3.FAMILY, bloom.FAMILY, mpt.FAMILY)}
_POSITIONS = {"rope": "RoPE", "alibi": "ALiBi"}
# "Llama (...), Mistral, ... (RoPE); BLOOM, MPT (ALiBi)": the families in error messages
SUPPORTED = "; ".join(f"{', '.join(f.label for f in FAMILIES.values() if f.position == pos)} ({shown})"
                      for pos, shown in _POSITIONS.items())
