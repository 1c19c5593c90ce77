"""Replay fixtures: the replay plugin's fixtures, bound to the demo model of tests/conftest.py.

A project outside this repository enables the plugin in its top-level conftest.py with
`pytest_plugins = ["context.replay.pytest_plugin"]`; pytest allows that only at the top level, so this
folder imports the fixtures instead (same effect here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from context.replay.pytest_plugin import replay  # noqa: F401  (the fixture)


@pytest.fixture(autouse=True)
def _one_torch_thread(one_thread: None) -> None:
    """One thread (tests/conftest.py's one_thread): the same thread count for every report."""


@pytest.fixture(scope="session")
def replay_engine(demo_engine: Any) -> Any:
    return demo_engine


@pytest.fixture(scope="session")
def replay_tokenizer(demo_gguf: Path) -> tuple[Any, int]:
    from chatcore.loader import open_checkpoint

    cfg, _, tok = open_checkpoint(demo_gguf)
    return tok, cfg.max_position_embeddings
