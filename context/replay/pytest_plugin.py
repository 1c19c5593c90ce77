"""pytest plugin: replay tests in a few lines.

Enable it in your top-level conftest.py:

    pytest_plugins = ["context.replay.pytest_plugin"]

then:

    def test_name_is_remembered(replay):
        run = replay("convs.jsonl", only=["trip"], window=2048, mode="forced", max_new_tokens=16)
        last = run.conversation("trip").turn(-1)
        assert last.in_context(1)                  # turn 1 is still in the prompt (kept or pinned)
        assert "alice" in last.reply.lower()      # the answer to the final, unanswered question

    def test_plans_unchanged(replay):
        replay("convs.jsonl", mode="plan", window=512, golden="tests/golden/plans.jsonl")

Fixtures: `replay` (a function: `replay(source, **options) -> ReplayRun`, see context.replay.replay;
`golden=PATH` compares the report with a golden file and fails with the per-turn diff; a conversation
that stopped on an error fails the test unless `allow_errors=True`), `replay_engine` (the model, loaded
once per session; override it to use your own) and `replay_tokenizer` (tokenizer and window only, for
mode="plan", which never loads weights). The model is `--replay-model` or `$CHATCORE_REPLAY_MODEL`
(default "demo"); `--replay-update-golden` or `CHATCORE_UPDATE_GOLDEN=1` rewrites golden files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .api import ReplayRun
from .api import replay as _replay
from .golden import check, update


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chatcore-replay")
    group.addoption("--replay-model", default=None, help="model for replay tests (default: demo)")
    group.addoption("--replay-update-golden", action="store_true", default=False,
                    help="rewrite the golden files of replay tests instead of comparing")


def _model(config: pytest.Config) -> str:
    return config.getoption("--replay-model", default=None) or os.environ.get("CHATCORE_REPLAY_MODEL") or "demo"


def _update(config: pytest.Config) -> bool:
    return bool(config.getoption("--replay-update-golden", default=False)) or \
        os.environ.get("CHATCORE_UPDATE_GOLDEN", "") not in ("", "0")


@pytest.fixture(scope="session")
def replay_engine(request: pytest.FixtureRequest) -> Any:
    """The model replay tests run (CPU, float32 unless $CHATCORE_REPLAY_DEVICE says otherwise)."""
    import chatcore

    device = os.environ.get("CHATCORE_REPLAY_DEVICE", "cpu")
    return chatcore.load(_model(request.config), device=device, dtype="float32" if device == "cpu" else None,
                         progress=lambda done, total: None)


@pytest.fixture(scope="session")
def replay_tokenizer(request: pytest.FixtureRequest) -> tuple[Any, int]:
    """(tokenizer, context length) of the replay model, without reading its weights."""
    from chatcore.loader import open_checkpoint, resolve

    cfg, _, tok = open_checkpoint(resolve(_model(request.config)))
    return tok, cfg.max_position_embeddings


@pytest.fixture
def replay(request: pytest.FixtureRequest) -> Callable[..., ReplayRun]:
    """`replay(source, mode="generate"|"forced"|"plan", window=..., policy={...}, max_new_tokens=...,
    seed=..., only=[ids], golden=PATH, allow_errors=False) -> ReplayRun`."""

    def run(source: Any, *, golden: str | Path | None = None, allow_errors: bool = False,
            **options: Any) -> ReplayRun:
        if options.get("mode", "generate") == "plan" and "engine" not in options:
            tok, window = request.getfixturevalue("replay_tokenizer")
            options.setdefault("tokenizer", tok)
            options.setdefault("engine_window", window)
            if "model" not in options:
                from chatcore.loader import resolve

                options["model"] = resolve(_model(request.config))  # the header names the model file
        else:
            options.setdefault("engine", request.getfixturevalue("replay_engine"))
        result = _replay(source, **options)
        if not allow_errors and not result.ok:
            problems = [str(e) for e in result.input_errors] + [
                f"{r.conversation}: {r.error}" for r in result.results if r.error is not None]
            pytest.fail("replay errors:\n" + "\n".join(problems), pytrace=False)
        if golden is not None:
            path = Path(golden)
            if _update(request.config):
                path.parent.mkdir(parents=True, exist_ok=True)
                update(result.records, path)
            elif not path.is_file():
                pytest.fail(f"golden file {path} does not exist; run with --replay-update-golden or "
                            "CHATCORE_UPDATE_GOLDEN=1 to create it", pytrace=False)
            else:
                diff = check(result.records, path)
                if diff:
                    pytest.fail(f"replay differs from {path}:\n" + "\n".join(diff), pytrace=False)
        return result

    return run
