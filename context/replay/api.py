"""`replay()`: conversations (a JSONL file, JSONL text, records or parsed ones) in, a `ReplayRun` out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from chatcore.errors import ChatcoreError

from .formats import InputError, RecordedConversation, load_file, parse_lines, parse_records
from .policy import context_config, normalize
from .report import header, records
from .runner import ConversationResult, Replayer, ReplayOptions, TurnResult


@dataclass(frozen=True)
class ReplayRun:
    """The outcome of a replay: settings header, per-conversation results, and malformed input lines."""

    header: dict[str, Any]
    results: tuple[ConversationResult, ...]
    input_errors: tuple[InputError, ...]

    @property
    def records(self) -> list[dict[str, Any]]:
        """The report records (see context.replay.report)."""
        return records(self.header, self.results, self.input_errors)

    @property
    def ok(self) -> bool:
        return not self.input_errors and all(r.error is None for r in self.results)

    def conversation(self, name: str | None = None) -> ConversationResult:
        """The result of conversation `name` (or the only one)."""
        if name is None:
            if len(self.results) != 1:
                raise KeyError(f"{len(self.results)} conversations were replayed; name one")
            return self.results[0]
        for r in self.results:
            if r.conversation == name:
                return r
        raise KeyError(f"no replayed conversation named {name!r}")

    @property
    def turns(self) -> list[TurnResult]:
        """Every replayed turn, in order (of the only conversation, typically)."""
        return [t for r in self.results for t in r.turns]


Source = str | Path | dict[str, Any] | Sequence[Any]


def _is_path(source: Source) -> TypeGuard[str | Path]:
    return isinstance(source, Path) or (isinstance(source, str) and "\n" not in source
                                        and not source.lstrip().startswith("{"))


def as_conversations(source: Source) -> tuple[list[RecordedConversation], list[InputError]]:
    """A path to a JSONL file; JSONL text (containing a newline or starting with '{'); one record
    (dict); a list of records; a list of messages (`{"role", "content"}` dicts); or Conversations."""
    if _is_path(source):
        return load_file(source)
    if isinstance(source, str):
        return parse_lines(source.splitlines(), "<text>")
    if isinstance(source, dict):
        return parse_records([source], "<record>")
    items = list(source)
    if items and all(isinstance(c, RecordedConversation) for c in items):
        return list(items), []
    if items and all(isinstance(m, dict) and "role" in m for m in items):
        return parse_records([{"id": "conversation", "messages": items}], "<messages>")
    return parse_records(items, "<records>")


class UnknownConversation(ChatcoreError):
    """``only`` names a conversation the input does not hold."""


def select(convs: list[RecordedConversation], errors: list[InputError], only: Sequence[str],
           source: str | Path) -> tuple[list[RecordedConversation], list[InputError]]:
    """The conversations named in ``only`` and their input errors; :class:`UnknownConversation` (naming the
    ids there are) if a name is in neither."""
    present = list(dict.fromkeys([c.id for c in convs] + [e.conversation for e in errors if e.conversation]))
    missing = [name for name in dict.fromkeys(only) if name not in present]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        ids = ", ".join(present[:8]) + (f", ... ({len(present)} in all)" if len(present) > 8 else "")
        held = f"its conversations: {ids}" if present else "it holds no conversation"
        raise UnknownConversation(f"no conversation {names} in {source}; {held}")
    wanted = set(only)
    return ([c for c in convs if c.id in wanted],
            [e for e in errors if e.conversation is None or e.conversation in wanted])


def model_name(engine: Any | None, model: str | Path | None) -> str:
    src = getattr(engine, "source", "") if engine is not None else ""
    return Path(str(src or model or "model")).name


def replay(source: Source, engine: Any | None = None, *, tokenizer: Any | None = None,
           engine_window: int | None = None, mode: str = "generate", window: int | None = None,
           policy: dict[str, Any] | None = None, seed: int = 0, max_new_tokens: int = 64, temperature: float = 0.0,
           model: str | Path | None = None, only: Sequence[str] = (),
           on_turn: Callable[[TurnResult], None] | None = None) -> ReplayRun:
    """Replay `source` with `engine` (or, in mode "plan", just a `tokenizer` and the model's
    `engine_window`). `policy`: context options as for --policy (a dict of key -> value)."""
    pol = normalize(policy or {})
    opts = ReplayOptions(mode=mode, config=context_config(pol, window, max_new_tokens), max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed)
    convs, errors = as_conversations(source)
    if only:
        convs, errors = select(convs, errors, only, str(source) if _is_path(source) else "the input")
    replayer = Replayer(engine, opts, tokenizer=tokenizer, engine_window=engine_window)
    results = replayer.replay_all(convs, on_turn)
    head = header(model_name(engine, model), mode, window, pol, seed, max_new_tokens, temperature)
    return ReplayRun(head, tuple(results), tuple(errors))
