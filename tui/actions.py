"""The app's user actions (key bindings and the command palette): selection, regenerate, edit, branches,
pin, system prompt, parameters, export, copy, and the session list's new / rename / delete. A mixin of
`ChatApp`, which owns the state these read (`session`, `engine`, `streaming`, ...) and the turn machinery.

Which actions may run now is decided in one place, `refusal`: `check_action` disables the others (the footer
dims them) and a key or palette command for a disabled action gets one notice saying why."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from textual import events
from textual.app import SystemCommand
from textual.screen import Screen
from textual.widgets import Input

from context.session import sampling_params

from . import keymap
from .display import MeterInfo, Row, export_name, meter_info, session_rows
from .screens import ConfirmScreen, HelpScreen, ParamsScreen, TextEditScreen
from .screens.params import FIELDS as PARAM_FIELDS
from .widgets.chat_view import code_blocks
from .widgets.meter import ContextMeter
from .widgets.session_list import SessionList

STREAMING = "A reply is still streaming; press Esc to cancel it."
# Actions on the live session (they need the model and a session), and those that wait for the reply.
_LIVE = frozenset({"regenerate", "edit", "branch", "toggle_pin", "system_prompt", "params", "export"})
_IDLE = _LIVE | {"new_session", "delete_session"}
_STORED = {"rename_session": "No session to rename.", "delete_session": "No session to delete."}


class Actions:
    def refusal(self, action: str) -> str | None:
        """Why `action` (an action name, without parameters) cannot run now; None when it can."""
        if action in _STORED and (self.library is None or self.session_id is None):
            return _STORED[action]
        if action in _LIVE and self.engine is None:
            return "The model is still loading." if self.load_state == "loading" else "The model failed to load."
        if action in _IDLE and self.streaming:
            return STREAMING
        if action in _LIVE and self.session is None:
            return "No session yet: send a message first."
        return None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return None if self.refusal(action) else True  # None: shown, dimmed

    def explain(self, action: str) -> bool:
        """Say why `action` ("name" or "name(args)") cannot run now, if it cannot; True if it said so."""
        reason = self.refusal(action.partition("(")[0])
        if reason is not None:
            self.notify(reason, severity="warning")
        return reason is not None

    def on_key(self, event: events.Key) -> None:
        """A key that reached the app unhandled: if it is bound to an action disabled now, say why."""
        active = self.screen.active_bindings.get(event.key)
        if active is not None and not active.enabled:
            self.explain(active.binding.action)

    async def run_command(self, action: str) -> None:
        """The command palette's way in: run `action`, or say why it cannot run now."""
        if not self.explain(action):
            await self.run_action(action)

    def action_cancel(self) -> None:
        if self.streaming and self.session is not None:
            self.session.cancel()
        elif self.view.selected is not None:
            self.view.clear_selection()

    async def action_select(self, step: int) -> None:
        await self.view.select(step)

    def action_new_session(self) -> None:
        self.session = self.session_id = None
        self.query_one(SessionList).current = None
        self.run_worker(self.view.show([]))
        self.query_one(ContextMeter).set_info(MeterInfo(window=self.engine.window if self.engine else 0))
        self.prompt.focus()

    def action_regenerate(self) -> None:
        self.start_turn("regenerate")

    def action_edit(self) -> None:
        row = self.view.target("user")
        if row is None:
            self.notify("There is no message of yours to edit.", severity="warning")
            return

        def done(text: str | None) -> None:
            if text is not None and text.strip() and text != row.content:
                self.start_turn("edit", text, row.id)

        self.push_screen(TextEditScreen("Edit message (saved as a new branch)", row.content, "Save and regenerate"),
                         done)

    def _apply(self, fn: Callable[[Any], Any], done: str | None = None, unselect: bool = False) -> None:
        """Run a change of the live session in the background, then re-show the thread (unselected, with
        `unselect`) and the meter and notify `done` (or what `fn` returned, if it returned text)."""
        session = self.session

        def work() -> tuple[list[Row], MeterInfo, Any]:
            result = fn(session)
            return session_rows(session), meter_info(session), result

        async def show(result: tuple[list[Row], MeterInfo, Any]) -> None:
            shown, info, said = result
            if unselect:
                self.view.clear_selection()
            await self.view.show(shown)
            self.query_one(ContextMeter).set_info(info)
            text = done or (said if isinstance(said, str) else None)
            if text:
                self.notify(text)

        self.bg(work, show)

    def action_branch(self, step: int) -> None:
        """Show another branch (an edit or regeneration sibling) of the selected / last message."""
        row = self.view.target()
        if row is None:
            return
        self._apply(lambda s: "Branch {} of {}.".format(*s.switch_branch(row.id, step)), unselect=True)

    def action_toggle_pin(self) -> None:
        row = self.view.target()
        if row is None:
            return
        if row.pinned:
            self._apply(lambda s: s.unpin(row.id), "Unpinned.")
        else:
            self._apply(lambda s: s.pin(row.id), "Pinned: it stays in context.")

    def action_system_prompt(self) -> None:
        def done(text: str | None) -> None:
            if text is not None:
                self._apply(lambda s: s.set_system(text.strip() or None), "System prompt saved.")

        self.push_screen(TextEditScreen("System prompt", self.session.system or ""), done)

    def action_params(self) -> None:
        stored = self.session.params

        def check(changed: dict[str, Any]) -> None:  # what set_params would refuse, refused in the form
            sampling_params({k: v for k, v in {**stored, **changed}.items() if v is not None})

        def done(values: dict[str, Any] | None) -> None:
            if values is not None:
                self._apply(lambda s: s.set_params(**values), "Parameters saved.")

        in_use = sampling_params(stored)
        current = {name: getattr(in_use, name) for name, _, _ in PARAM_FIELDS}
        self.push_screen(ParamsScreen(current, check), done)

    def action_export(self, fmt: str) -> None:
        session, library, directory = self.session, self.library, self.export_dir

        def write() -> str:
            text = session.export(fmt)
            path = os.path.join(directory, export_name(library.get(session.id).title, session.id, fmt))
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return path

        self.bg(write, lambda path: self.notify(f"Exported to {path}"))

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
        library, sid = self.library, self.session_id
        title = self.query_one(SessionList).title_of(sid)

        def done(text: str | None) -> None:
            if text is not None and text.strip():
                self.bg(lambda: library.rename(sid, text.strip()), lambda _: self.refresh_sessions())

        self.push_screen(TextEditScreen("Rename session", title), done)

    def action_delete_session(self) -> None:
        library, sid = self.library, self.session_id
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
                self.bg(lambda: library.delete(sid), deleted)

        self.push_screen(ConfirmScreen(f"Delete session {title!r} and all its messages?"), done)

    def action_help(self) -> None:
        self.push_screen(HelpScreen(keymap.effective_keys(self.keys)))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        keys = keymap.effective_keys(self.keys)
        for a in keymap.ACTIONS:
            yield SystemCommand(a.description, f"key: {keys[a.id]}", partial(self.run_command, a.action))

    async def action_quit(self) -> None:
        if self.streaming and self.session is not None:
            self.session.cancel()
        self.exit()
