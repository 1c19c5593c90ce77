from __future__ import annotations

from collections.abc import Mapping

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Markdown

from ..keymap import ACTIONS

INTRO = """\
Type a message and press **Enter**; **shift+enter** or **ctrl+j** starts a new line (many terminals send
shift+enter as a plain Enter: ctrl+j always works). **Esc** stops a reply (the partial text is kept).
Actions apply to the selected message (**alt+up / alt+down**), else to the last one.
**ctrl+p** opens the command palette (every action is there). **ctrl+q** quits.
Remap keys in `keymap.toml` (in `$CHATCORE_HOME` or `~/.config/chatcore`) or `$CHATCORE_KEYMAP`.
"""


def help_markdown(keys: Mapping[str, str]) -> str:
    lines = [INTRO, "| key | action | id |", "| --- | --- | --- |"]
    lines += [f"| `{keys.get(a.id, a.key)}` | {a.description} | `{a.id}` |" for a in ACTIONS]
    return "\n".join(lines)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "close", "Close", priority=True)]

    def __init__(self, keys: Mapping[str, str]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("chatcore — help (Esc to close)")
            yield Markdown(help_markdown(self.keys))

    def action_close(self) -> None:
        self.dismiss(None)
