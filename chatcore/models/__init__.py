"""Model families by name; each family is one small file (RoPE families share the Llama block)."""

from __future__ import annotations

from chatcore.models.bloom import BloomModel
from chatcore.models.gemma3 import Gemma3Model
from chatcore.models.llama import LlamaModel
from chatcore.models.mistral import MistralModel
from chatcore.models.mpt import MptModel
from chatcore.models.qwen2 import Qwen2Model
from chatcore.models.qwen3 import Qwen3Model

FAMILIES = {"llama": LlamaModel, "mistral": MistralModel, "qwen2": Qwen2Model, "qwen3": Qwen3Model,
            "gemma3": Gemma3Model, "bloom": BloomModel, "mpt": MptModel}
