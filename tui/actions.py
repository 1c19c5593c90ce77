"""The app's user actions (key bindings and the command palette): selection, regenerate, edit, branches,
pin, system prompt, parameters, export, copy, and the session list's new / rename / delete. A mixin of
`ChatApp`, which owns the state these read (`session`, `engine`, `busy`, ...) and the turn machinery."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from textual.app import SystemCommand
from textual.screen import Screen
from textual.widgets import Input

from . import keymap
from .screens import ConfirmScreen, HelpScreen, ParamsScreen, TextEditScreen
from .widgets.chat_view import code_blocks
from .widgets.meter import ContextMeter
from .widgets.session_list import SessionList
from .workers import MeterInfo, Row, export_to, meter_info, session_rows


class Actions:
    def _live(self) -> bool:
        if self.engine is None:
            self.notify("The model is still loading." if self.load_state == "loading" else
                        "The model failed to load.", severity="warning")
            return False
        if self.busy:
            self.notify("A reply is still streaming; press Esc to cancel it.", severity="warning")
            return False
        if self.session is None:
            self.notify("No session yet: send a message first.", severity="warning")
            return False
        return True

    def action_cancel(self) -> None:
        if self.busy and self.session is not None:
            self.session.cancel()
        elif self.view.selected is not None:
            self.view.clear_selection()

    async def action_select(self, step: int) -> None:
        await self.view.select(step)

    def action_new_session(self) -> None:
        if self.busy:
            self.notify("A reply is still streaming; press Esc to cancel it.", severity="warning")
            return
        self.session = self.session_id = None
        self.query_one(SessionList).current = None
        self.run_worker(self.view.show([]))
        self.query_one(ContextMeter).set_info(MeterInfo(window=self.engine.window if self.engine else 0))
        self.prompt.focus()

    def action_regenerate(self) -> None:
        if self._live():
            self.start_turn("regenerate")

    def action_edit(self) -> None:
        if not self._live():
            return
        row = self.view.target("user")
        if row is None:
            self.notify("There is no message of yours to edit.", severity="warning")
            return

        def done(text: str | None) -> None:
            if text is not None and text.strip() and text != row.content:
                self.start_turn("edit", text, row.id)

        self.push_screen(TextEditScreen("Edit message (saved as a new branch)", row.content, "Save and regenerate"),
                         done)

    def _apply(self, fn: Callable[[Any], Any], done: str | None = None) -> None:
        """Run a session change in the background, then re-show the thread and the meter."""
        session = self.session

        def work() -> tuple[list[Row], MeterInfo]:
            fn(session)
            return session_rows(session), meter_info(session)

        async def show(result: tuple[list[Row], MeterInfo]) -> None:
            await self.view.show(result[0])
            self.query_one(ContextMeter).set_info(result[1])
            if done:
                self.notify(done)

        self.bg(work, show)

    def action_branch(self, step: int) -> None:
        """Show another branch (an edit or regeneration sibling) of the selected / last message."""
        if not self._live():
            return
        row = self.view.target()
        if row is None:
            return
        store, sid = self.store, self.session.id

        def switch() -> str:
            sibs = [m.id for m in store.load(sid).siblings(row.id)]
            if len(sibs) < 2:
                raise LookupError("this message has no other branch (edit or regenerate to make one)")
            store.switch_branch(sid, sibs[(sibs.index(row.id) + step) % len(sibs)])
            self.sessions.pop(sid, None)  # reopened on the new branch (its KV slot is reused)
            return f"Branch {(sibs.index(row.id) + step) % len(sibs) + 1} of {len(sibs)}."

        def done(text: str) -> None:
            self.session = None
            self.view.clear_selection()
            self.open_session(sid)
            self.notify(text)

        self.bg(switch, done)

    def action_toggle_pin(self) -> None:
        if not self._live():
            return
        row = self.view.target()
        if row is None:
            return
        if row.pinned:
            self._apply(lambda s: s.unpin(row.id), "Unpinned.")
        else:
            self._apply(lambda s: s.pin(row.id), "Pinned: it stays in context.")

    def action_system_prompt(self) -> None:
        if not self._live():
            return

        def done(text: str | None) -> None:
            if text is not None:
                self._apply(lambda s: s.set_system(text.strip() or None), "System prompt saved.")

        self.push_screen(TextEditScreen("System prompt", self.session.system or ""), done)

    def action_params(self) -> None:
        if not self._live():
            return

        def done(values: dict[str, Any] | None) -> None:
            if values is not None:
                self._apply(lambda s: s.set_params(**values), "Parameters saved.")

        self.push_screen(ParamsScreen(self.session.params), done)

    def action_export(self, fmt: str) -> None:
        if not self._live():
            return
        session, directory = self.session, self.export_dir
        self.bg(lambda: export_to(session, fmt, directory), lambda path: self.notify(f"Exported to {path}"))

    def copy_text(self, text: str, what: str) -> None:
        """OSC 52 through Textual; also written to a file, since not every terminal honours OSC 52."""
        self.copy_to_clipboard(text)
        try:
            self.clipboard_file.parent.mkdir(parents=True, exist_ok=True)
            self.clipboard_file.write_text(text, encoding="utf-8")
            where = f" (also in {self.clipboard_file})"
        except OSError:
            where = ""
        self.notify(f"Copied {what}, {len(text)} characters{where}.")

    def action_copy_message(self) -> None:
        row = self.view.target()
        text = row.content if row is not None else self.view.streaming_text
        if not text:
            self.notify("Nothing to copy.", severity="warning")
            return
        self.copy_text(text, "the message")

    def action_copy_code(self) -> None:
        rows = [self.view.target()] if self.view.selected is not None else list(reversed(self.view.rows))
        for row in rows:
            blocks = code_blocks(row.content) if row is not None else []
            if blocks:
                self.copy_text(blocks[-1], "a code block")
                return
        self.notify("No code block to copy.", severity="warning")

    def action_toggle_sessions(self) -> None:
        self.query_one(SessionList).toggle_class("-hidden")

    def action_filter_sessions(self) -> None:
        self.query_one(SessionList).remove_class("-hidden")
        self.query_one("#filter", Input).focus()

    def action_rename_session(self) -> None:
        if self.store is None or self.session_id is None:
            self.notify("No session to rename.", severity="warning")
            return
        store, sid = self.store, self.session_id
        title = self.query_one(SessionList).title_of(sid)

        def done(text: str | None) -> None:
            if text is not None and text.strip():
                self.bg(lambda: store.update_session(sid, title=text.strip()), lambda _: self.refresh_sessions())

        self.push_screen(TextEditScreen("Rename session", title), done)

    def action_delete_session(self) -> None:
        if self.store is None or self.session_id is None:
            self.notify("No session to delete.", severity="warning")
            return
        if self.busy:
            self.notify("A reply is still streaming; press Esc to cancel it.", severity="warning")
            return
        store, sid = self.store, self.session_id
        title = self.query_one(SessionList).title_of(sid) or "(untitled)"

        def deleted(_: Any) -> None:
            self.sessions.pop(sid, None)
            if self.pool is not None:
                self.pool.discard(sid)
            if self.session_id == sid:
                self.action_new_session()
            self.refresh_sessions()
            self.notify(f"Deleted {title!r}.")

        def done(yes: bool | None) -> None:
            if yes:
                self.bg(lambda: store.delete_session(sid), deleted)

        self.push_screen(ConfirmScreen(f"Delete session {title!r} and all its messages?"), done)

    def action_help(self) -> None:
        self.push_screen(HelpScreen(keymap.effective_keys(self.keys)))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        keys = keymap.effective_keys(self.keys)
        for a in keymap.ACTIONS:
            yield SystemCommand(a.description, f"key: {keys[a.id]}", partial(self.run_action, a.action))

    async def action_quit(self) -> None:
        if self.busy and self.session is not None:
            self.session.cancel()
        self.exit()
