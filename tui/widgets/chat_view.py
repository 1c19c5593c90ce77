"""The chat view: the current branch's messages, newest at the bottom.

A finished message is one light widget (`MessageView`: a header line and the body rendered as Markdown by
Rich, about 1 ms to mount). The reply being streamed is a `MessageBox` holding Textual's `Markdown` widget,
written through `MarkdownStream` (appends, no re-parse of the whole reply per token); once the reply is
done it is swapped for a `MessageView`. The last PAGE messages are mounted when a session opens; older ones
are mounted a page at a time when the view is scrolled to the top, the "earlier" line is clicked, or the
selection moves past the first mounted message.
"""

from __future__ import annotations

import re
from typing import Any

from markdown_it import MarkdownIt
from rich.console import Group, RenderableType
from rich.markdown import Markdown as RichMarkdown
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Markdown, Static
from textual.widgets._markdown import MarkdownStream

from ..display import Row

PAGE = 24  # messages mounted when a session opens, and per "earlier" page
_CODE = re.compile(r"```[^\n]*\n(.*?)```", re.S)


def keep_breaks(tokens: list[Any]) -> None:
    """Turn every line break inside a paragraph into a hard break (Markdown joins a single newline into a
    space; a chat shows it as typed). Code blocks are not inline text, so they are untouched."""
    for token in tokens:
        for child in token.children or ():
            if child.type == "softbreak":
                child.type = "hardbreak"


class Body(RichMarkdown):
    """A message body as Rich Markdown, its line breaks kept (`keep_breaks`)."""

    def __init__(self, markup: str) -> None:
        super().__init__(markup)
        keep_breaks(self.parsed)


def stream_parser() -> MarkdownIt:
    """The streamed reply's parser: Textual's default ("gfm-like"), its line breaks kept as in `Body`."""
    parser = MarkdownIt("gfm-like")
    parser.core.ruler.push("keep_breaks", lambda state: keep_breaks(state.tokens))
    return parser


def code_blocks(text: str) -> list[str]:
    return [m.group(1).rstrip("\n") for m in _CODE.finditer(text)]


NOT_SAVED = "not saved yet — retrying"  # a message kept in memory while storage is unreachable


def header_text(row: Row, streaming: bool = False) -> str:
    flags = []
    if row.pinned:
        flags.append("pinned")
    if not row.in_context:
        flags.append("out of context")
    if row.status not in ("complete", "streaming") and not streaming:
        flags.append(row.status)
    if row.pending:
        flags.append(NOT_SAVED)
    if streaming:
        flags.append("…")
    branch = f" ‹{row.branch[0]}/{row.branch[1]}›" if row.branch is not None else ""
    return row.role + branch + (" · " + " · ".join(flags) if flags else "")


def _classes(row: Row) -> str:
    return " ".join(["message", f"-{row.role}", *(["-out"] if not row.in_context else []),
                     *(["-pinned"] if row.pinned else []), *(["-pending"] if row.pending else [])])


class MessageView(Widget):
    """A finished message as a single widget: its header line, then its Markdown body (parsed once)."""

    COMPONENT_CLASSES = {"message--header"}

    def __init__(self, row: Row) -> None:
        super().__init__(classes=_classes(row))
        self.row = row
        self._body = Body(row.content)

    @property
    def message_id(self) -> str:
        return self.row.id

    @property
    def header(self) -> str:
        return header_text(self.row)

    def render(self) -> RenderableType:
        return Group(Text(self.header, style=self.get_component_rich_style("message--header")),
                     self._body)

    def update_row(self, row: Row) -> None:
        old, self.row = self.row, row
        self.set_class(not row.in_context, "-out")
        self.set_class(row.pinned, "-pinned")
        self.set_class(row.pending, "-pending")
        if row.content != old.content:
            self._body = Body(row.content)
        if row != old:
            self.refresh(layout=True)


class MessageBox(Vertical):
    """The reply being streamed: a header line and Textual's Markdown widget fed by a MarkdownStream."""

    def __init__(self, row: Row) -> None:
        super().__init__(classes=_classes(row) + " -streaming")
        self.row = row
        self.text = row.content

    @property
    def message_id(self) -> str:
        return self.row.id

    @property
    def header(self) -> str:
        return header_text(self.row, streaming=True)

    def compose(self) -> ComposeResult:
        yield Static(self.header, classes="header")
        yield Markdown(self.row.content, classes="body", parser_factory=stream_parser)


class ChatView(VerticalScroll):
    """Auto-scrolls while anchored at the bottom; scrolling up releases it (Textual's anchor)."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.rows: list[Row] = []
        self.first = 0  # index in rows of the first mounted message
        self.selected: int | None = None
        self._stream: MarkdownStream | None = None
        self._reply: MessageBox | None = None
        self._settled = False  # False while show() rebuilds the view (its scroll moves are not the user's)

    def compose(self) -> ComposeResult:
        yield Static("", id="earlier")

    def on_mount(self) -> None:
        self.anchor()

    # -- whole thread -------------------------------------------------------------------------------
    def boxes(self) -> list[MessageView | MessageBox]:
        return [w for w in self.children if isinstance(w, (MessageView, MessageBox))]

    async def show(self, rows: list[Row]) -> None:
        """Make the view show `rows`: keep the mounted messages that are unchanged in place (updating their
        flags and text), replace the rest; a session opens on its last PAGE messages."""
        self._settled = False
        await self.end_stream()
        boxes = self.boxes()
        first = max(0, len(rows) - PAGE)
        if boxes and self.first < len(rows) and rows[self.first].id == boxes[0].message_id:
            first = self.first  # the same thread, perhaps longer: keep what the user has paged in
        shown = rows[first:]
        keep = 0
        for box, row in zip(boxes, shown, strict=False):
            if not isinstance(box, MessageView) or box.message_id != row.id:
                break
            keep += 1
        with self.app.batch_update():
            for box, row in zip(boxes[:keep], shown, strict=False):
                box.update_row(row)
            if boxes[keep:]:
                await self.remove_children(boxes[keep:])
            if shown[keep:]:
                await self.mount_all([MessageView(r) for r in shown[keep:]])
        self.rows, self.first = list(rows), first
        self._update_earlier()
        if self.selected is not None and self.selected >= len(rows):
            self.selected = None
        self._mark_selected()
        self.call_after_refresh(self._settle)

    def _settle(self) -> None:
        self._settled = True

    def _update_earlier(self) -> None:
        label = self.query_one("#earlier", Static)
        label.update(f"▲ {self.first:,} earlier message{'s' if self.first != 1 else ''} "
                     f"(scroll up or click to show {min(PAGE, self.first)} more)" if self.first else "")
        label.display = self.first > 0

    async def show_earlier(self, count: int = PAGE) -> int:
        """Mount up to `count` older messages above the first mounted one; the view keeps its place."""
        boxes = self.boxes()
        if self.first == 0 or not boxes:
            return 0
        start = max(0, self.first - count)
        anchor = boxes[0]
        await self.mount_all([MessageView(r) for r in self.rows[start:self.first]], before=anchor)
        added, self.first = self.first - start, start
        self._update_earlier()
        self._mark_selected()
        self.call_after_refresh(self.scroll_to_widget, anchor, top=True, animate=False)
        return added

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if self._settled and new_value <= 0 < old_value and self.first > 0:
            self._settled = False  # one page per arrival at the top
            self.run_worker(self._page_in(), group="earlier", exclusive=True)

    async def _page_in(self) -> None:
        await self.show_earlier()
        self.call_after_refresh(self._settle)

    async def on_click(self, event: events.Click) -> None:
        if event.widget is not None and event.widget.id == "earlier":
            await self.show_earlier()

    # -- streaming ----------------------------------------------------------------------------------
    async def start_reply(self) -> None:
        await self.end_stream()
        box = MessageBox(Row("", "assistant", "", "streaming"))
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
    async def select(self, step: int) -> Row | None:
        if not self.rows:
            return None
        cur = self.selected if self.selected is not None else len(self.rows)
        want = min(max(cur + step, 0), len(self.rows) - 1)
        if want < self.first:
            await self.show_earlier()
        self.selected = max(want, self.first)
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
