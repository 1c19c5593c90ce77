from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

FIELDS: tuple[tuple[str, type, str], ...] = (
    ("temperature", float, "0 = greedy"),
    ("top_p", float, "1.0 = off"),
    ("top_k", int, "0 = off"),
    ("min_p", float, "0.0 = off"),
    ("repetition_penalty", float, "1.0 = off"),
    ("max_new_tokens", int, "reply length cap"),
    ("seed", int, "empty = random"),
)


def field_text(value: Any) -> str:
    return "" if value is None else str(value)


def parse_params(values: dict[str, str]) -> dict[str, Any]:
    """Form text -> sampling values (empty -> None, i.e. the default). Raises ValueError naming the field."""
    out: dict[str, Any] = {}
    for name, kind, _ in FIELDS:
        text = values.get(name, "").strip()
        if not text:
            out[name] = None
            continue
        try:
            out[name] = kind(text)
        except ValueError:
            raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    return out


class ParamsScreen(ModalScreen[dict[str, Any] | None]):
    """Sampling parameters of the session, each field showing the value in use. Dismisses with the fields
    that were changed (None for one emptied: back to the default), or None when cancelled. `check` is called
    with them first: a ValueError it raises is shown in the form, which stays open with what was typed."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", priority=True), Binding("ctrl+s", "save", "Save", priority=True)]

    def __init__(self, current: dict[str, Any], check: Callable[[dict[str, Any]], Any] | None = None) -> None:
        super().__init__()
        self.current = {name: field_text(current.get(name)) for name, _, _ in FIELDS}
        self.check = check

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Sampling parameters (empty = default)")
            for name, _, hint in FIELDS:
                with Horizontal(classes="field"):
                    yield Label(name, classes="name")
                    yield Input(self.current[name], placeholder=hint, id=f"p-{name}", compact=True)
            yield Label("", id="error")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_save()

    def action_save(self) -> None:
        # ctrl+s is a priority binding: it runs before the keys typed just ahead of it reach the field.
        # Read the fields once the focused one has handled them (a call queued behind them).
        (self.focused or self).call_later(self._save)

    def _save(self) -> None:
        if not self.is_active:
            return
        typed = {n: self.query_one(f"#p-{n}", Input).value for n, _, _ in FIELDS}
        try:
            parsed = parse_params(typed)
            changed = {n: v for n, v in parsed.items() if typed[n].strip() != self.current[n]}
            if self.check is not None:
                self.check(changed)
        except ValueError as exc:
            self.query_one("#error", Label).update(str(exc).splitlines()[0])
            return
        self.dismiss(changed)

    def action_cancel(self) -> None:
        self.dismiss(None)
