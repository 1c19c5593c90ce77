"""chatcore: a long-context chat engine for local language models (the generation core).

The public names load lazily, so ``chatcore`` subcommands that need no model start without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chatcore.batch.engine import BatchConfig, BatchEngine
    from chatcore.engine import Engine
    from chatcore.errors import ChatcoreError
    from chatcore.generation import GenerationStats, TokenEvent
    from chatcore.loader import load
    from chatcore.sampling import SamplingParams

_EXPORTS = {
    "BatchConfig": "chatcore.batch.engine",
    "BatchEngine": "chatcore.batch.engine",
    "ChatcoreError": "chatcore.errors",
    "Engine": "chatcore.engine",
    "GenerationStats": "chatcore.generation",
    "SamplingParams": "chatcore.sampling",
    "TokenEvent": "chatcore.generation",
    "load": "chatcore.loader",
}
__all__ = ["BatchConfig", "BatchEngine", "ChatcoreError", "Engine", "GenerationStats", "SamplingParams", "TokenEvent",
           "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'chatcore' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
