from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, TextArea


class TextEditScreen(ModalScreen[str | None]):
    """Edit a text (a message, the system prompt, a title). ctrl+s saves, Esc cancels (None)."""

    BINDINGS = [Binding("ctrl+s", "save", "Save", priority=True), Binding("escape", "cancel", "Cancel", priority=True)]

    def __init__(self, title: str, text: str = "", save: str = "Save") -> None:
        super().__init__()
        self.title_text, self.text, self.save_label = title, text, save

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label(self.title_text + "  (ctrl+s to save, Esc to cancel)")
            yield TextArea(self.text, id="text", soft_wrap=True)
            with Horizontal(classes="buttons"):
                yield Button(self.save_label, variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        area = self.query_one(TextArea)
        area.focus()
        area.move_cursor(area.document.end)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()

    def action_save(self) -> None:
        # ctrl+s is a priority binding: it runs before the keys typed just ahead of it reach the text area.
        # Read the text once the text area has handled them (a call queued behind them).
        self.query_one(TextArea).call_later(self._save)

    def _save(self) -> None:
        if self.is_active:
            self.dismiss(self.query_one(TextArea).text)

    def action_cancel(self) -> None:
        self.dismiss(None)
