"""The chat view: one MessageBox per message of the current branch; the streaming reply is written
through Textual's MarkdownStream (appends, no re-parse of the whole reply per token)."""

from __future__ import annotations

import re

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Markdown, Static
from textual.widgets._markdown import MarkdownStream

from ..workers import Row

SHOWN = 24  # messages mounted at once; older ones stay in storage (a label says how many)
_CODE = re.compile(r"```[^\n]*\n(.*?)```", re.S)


def code_blocks(text: str) -> list[str]:
    return [m.group(1).rstrip("\n") for m in _CODE.finditer(text)]


class MessageBox(Vertical):
    """One message: a header line (role, flags) and its Markdown body."""

    def __init__(self, row: Row, streaming: bool = False) -> None:
        super().__init__(classes=f"message -{row.role}")
        self.row = row
        self.streaming = streaming
        self.text = row.content

    @property
    def message_id(self) -> str:
        return self.row.id

    def compose(self) -> ComposeResult:
        yield Static(self._header(), classes="header")
        yield Markdown(self.row.content, classes="body")

    def _header(self) -> str:
        flags = []
        if self.row.pinned:
            flags.append("pinned")
        if not self.row.in_context:
            flags.append("out of context")
        if self.row.status not in ("complete", "streaming") and not self.streaming:
            flags.append(self.row.status)
        if self.streaming:
            flags.append("…")
        return self.row.role + (" · " + " · ".join(flags) if flags else "")

    def update_row(self, row: Row) -> None:
        self.row = row
        self.streaming = False
        self.set_class(not row.in_context, "-out")
        self.set_class(row.pinned, "-pinned")
        if self.is_mounted:
            self.query_one(".header", Static).update(self._header())
        if row.content != self.text:
            self.text = row.content
            if self.is_mounted:
                self.query_one(Markdown).update(row.content)

    def on_mount(self) -> None:
        self.set_class(not self.row.in_context, "-out")
        self.set_class(self.row.pinned, "-pinned")


class ChatView(VerticalScroll):
    """Auto-scrolls while anchored at the bottom; scrolling up releases it (Textual's anchor)."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.rows: list[Row] = []
        self.selected: int | None = None
        self._stream: MarkdownStream | None = None
        self._reply: MessageBox | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="earlier")

    def on_mount(self) -> None:
        self.anchor()

    # -- whole thread -------------------------------------------------------------------------------
    def boxes(self) -> list[MessageBox]:
        return list(self.query(MessageBox))

    async def show(self, rows: list[Row]) -> None:
        """Make the view show `rows`: update boxes already shown (same ids, in order), mount the rest."""
        await self.end_stream()
        shown = rows[-SHOWN:]
        boxes = self.boxes()
        ids = [b.message_id for b in boxes]
        new_ids = [r.id for r in shown]
        if ids and ids == new_ids[: len(ids)]:
            for box, row in zip(boxes, shown, strict=False):
                box.update_row(row)
            rest = shown[len(ids):]
        else:
            await self.remove_children(MessageBox)
            rest = shown
        if rest:
            await self.mount_all([MessageBox(r) for r in rest])
        self.rows = list(rows)
        hidden = len(rows) - len(shown)
        self.query_one("#earlier", Static).update(
            f"{hidden} earlier messages are in storage (export to read them)" if hidden else "")
        self.query_one("#earlier").display = bool(hidden)
        if self.selected is not None and self.selected >= len(rows):
            self.selected = None
        self._mark_selected()

    # -- streaming ----------------------------------------------------------------------------------
    async def start_reply(self) -> None:
        await self.end_stream()
        box = MessageBox(Row("", "assistant", "", "streaming"), streaming=True)
        await self.mount(box)
        self._reply = box
        self._stream = Markdown.get_stream(box.query_one(Markdown))

    async def write_reply(self, message_id: str, text: str) -> None:
        if self._reply is None or self._stream is None:
            return
        if not self._reply.row.id:
            self._reply.row = Row(message_id, "assistant", "", "streaming")
        self._reply.text += text
        await self._stream.write(text)

    async def end_stream(self) -> None:
        if self._stream is not None:
            await self._stream.stop()
        self._stream = None
        if self._reply is not None and not self._reply.row.id:
            await self._reply.remove()  # nothing arrived
        self._reply = None

    @property
    def streaming_text(self) -> str:
        return self._reply.text if self._reply is not None else ""

    # -- selection ----------------------------------------------------------------------------------
    def select(self, step: int) -> Row | None:
        if not self.rows:
            return None
        first = max(0, len(self.rows) - SHOWN)
        cur = self.selected if self.selected is not None else len(self.rows)
        self.selected = min(max(cur + step, first), len(self.rows) - 1)
        self._mark_selected()
        return self.rows[self.selected]

    def clear_selection(self) -> None:
        self.selected = None
        self._mark_selected()

    def target(self, role: str | None = None) -> Row | None:
        """The selected message, else the last one (of `role`)."""
        if self.selected is not None and self.selected < len(self.rows):
            row = self.rows[self.selected]
            if role is None or row.role == role:
                return row
        for row in reversed(self.rows):
            if role is None or row.role == role:
                return row
        return None

    def _mark_selected(self) -> None:
        sel = self.rows[self.selected].id if self.selected is not None else None
        for box in self.boxes():
            box.set_class(sel is not None and box.message_id == sel, "-selected")
            if sel is not None and box.message_id == sel:
                self.scroll_to_widget(box, animate=False)
