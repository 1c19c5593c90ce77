from __future__ import annotations

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
    ("max_new_tokens", int, "reply length cap"),
    ("seed", int, "empty = random"),
)


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
    """Sampling parameters of the session. Dismisses with the values (None = cancelled)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", priority=True), Binding("ctrl+s", "save", "Save", priority=True)]

    def __init__(self, current: dict[str, Any]) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Sampling parameters (empty = default)")
            for name, _, hint in FIELDS:
                with Horizontal(classes="field"):
                    yield Label(name, classes="name")
                    value = self.current.get(name)
                    yield Input("" if value is None else str(value), placeholder=hint, id=f"p-{name}")
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
        try:
            values = parse_params({n: self.query_one(f"#p-{n}", Input).value for n, _, _ in FIELDS})
        except ValueError as exc:
            self.query_one("#error", Label).update(str(exc))
            return
        self.dismiss(values)

    def action_cancel(self) -> None:
        self.dismiss(None)
