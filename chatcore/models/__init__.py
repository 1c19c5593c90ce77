"""Model families by name; each family is one small file."""

from __future__ import annotations

from chatcore.models.llama import LlamaModel

FAMILIES = {"llama": LlamaModel}
