"""chatcore: a long-context chat engine for local language models (the generation core)."""

from chatcore.engine import Engine, GenerationStats, TokenEvent
from chatcore.errors import ChatcoreError
from chatcore.loader import load
from chatcore.sampling import SamplingParams

__all__ = ["ChatcoreError", "Engine", "GenerationStats", "SamplingParams", "TokenEvent", "load"]
__version__ = "0.1.0"
