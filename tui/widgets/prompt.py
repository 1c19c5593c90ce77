"""The message box: a TextArea where Enter sends and Shift+Enter or Ctrl+J breaks the line.

Many terminals send the same bytes for Shift+Enter as for Enter; Ctrl+J (a line feed) always arrives as its
own key. The box grows with its text up to a few lines (then scrolls) and keeps whatever is in it until the
app clears it after a message is sent; pasting multi-line text inserts it as it is.
"""

from __future__ import annotations

from dataclasses import replace

from textual import events
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import TextArea

from .. import keymap

# TextArea's own keys that the app's default bindings use (ctrl+y redo, f6 select line): dropped here so
# they reach the app (copy message, copy code block) while the message box has focus.
_APP_KEYS = {k.strip() for a in keymap.ACTIONS for k in a.key.split(",")}


def _without(bindings: list[BindingType], keys: set[str]) -> list[BindingType]:
    out: list[BindingType] = []
    for b in bindings:
        if not isinstance(b, Binding):
            out.append(b)
            continue
        kept = [k for k in b.key.split(",") if k.strip() not in keys]
        if kept:
            out.append(replace(b, key=",".join(kept)))
    return out


class PromptInput(TextArea, inherit_bindings=False):
    class Submitted(Message):
        """Enter was pressed; `value` is the whole text (the box is not cleared here)."""

        def __init__(self, prompt: PromptInput, value: str) -> None:
            super().__init__()
            self.prompt, self.value = prompt, value

        @property
        def control(self) -> PromptInput:
            return self.prompt

    BINDINGS = _without(TextArea.BINDINGS, _APP_KEYS)
    NEWLINE_KEYS = ("shift+enter", "ctrl+j")

    def __init__(self, placeholder: str = "", *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(soft_wrap=True, tab_behavior="focus", highlight_cursor_line=False, placeholder=placeholder,
                         id=id)

    @property
    def value(self) -> str:
        return self.text

    @value.setter
    def value(self, text: str) -> None:
        self.load_text(text)
        self.move_cursor(self.document.end)

    async def _on_key(self, event: events.Key) -> None:
        # Handled here, as TextArea handles typed characters, not as a binding: bindings run once the key has
        # bubbled up to the app, after keys typed just behind it (seen in tmux: "a ctrl+j b" gave "ab\n").
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
        elif event.key in self.NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.move_cursor(self.replace("\n", *self.selection, maintain_selection_offset=False).end_location)
        else:
            await super()._on_key(event)
