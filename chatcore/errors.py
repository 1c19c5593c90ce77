"""Errors the user can act on: each carries a one-line message saying what is wrong and what to do."""

from __future__ import annotations


class ChatcoreError(Exception):
    """Base class for user-facing errors (the CLI prints the message alone, no traceback)."""


class ModelNotFound(ChatcoreError):
    """The model path does not exist or holds no model."""


class ModelFormatError(ChatcoreError):
    """The model files exist but are missing pieces, corrupt, or of an unsupported kind."""


class UnsupportedArchitecture(ModelFormatError):
    """The model's architecture is not one chatcore implements."""


class LoadOptionError(ChatcoreError, ValueError):
    """An option of ``chatcore.load`` that cannot work: an unsupported dtype, a window or prefill chunk that
    is not positive (a ``ValueError`` too, as these were before they had a class of their own)."""


class DeviceUnavailable(LoadOptionError):
    """The device asked for does not exist or is not available here (CUDA on a CPU-only torch, a GPU index
    past the visible ones)."""


class PromptTooLong(ChatcoreError):
    """A prompt does not fit the context window."""


class TokenizerMissing(ChatcoreError):
    """Text was given to a model loaded without a tokenizer."""


class TensorParallelError(ChatcoreError):
    """A tensor-parallel setting that cannot work: a size that does not divide the model, too few GPUs."""


class RankFailed(ChatcoreError):
    """A tensor-parallel rank stopped or stopped answering; the engine is closed (load the model again)."""


class OutOfBlocks(ChatcoreError):
    """The paged KV memory has no block left to give: every block is held by a running sequence."""
