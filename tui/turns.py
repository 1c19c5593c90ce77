"""The app's turns: the prompt's text sent (or held while the app starts), a reply's stream drained in the
turn worker into the view, and what a refused or finished turn shows. A mixin of `ChatApp`, which owns the
state these read and write (`streaming`, `session`, `engine`, `pending`, ...)."""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial

from textual import work

from context import ChatSession, MessageTooLong

from .actions import STREAMING
from .display import MeterInfo, Row, describe, meter_info, session_rows
from .widgets.meter import ContextMeter
from .widgets.prompt import PromptInput


class Turns:
    # -- turns --------------------------------------------------------------------------------------
    def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.streaming:
            self.notify(STREAMING, severity="warning")
            return
        if self.store_state == "failed":
            self.notify("Storage is not available, so the message cannot be saved; it stays in the input.",
                        severity="error")
            return
        if self.load_state == "failed":
            self.notify("The model failed to load; restart with --model PATH. Your text stays in the input.",
                        severity="error")
            return
        event.prompt.value = ""
        if self.engine is None or self.library is None or (self.session is None and self.session_id is not None):
            self.pending.append(text)
            self.notify("Still starting; your message will be sent when the model is ready.")
            return
        self.start_turn("send", text)

    def _restore(self, text: str) -> None:
        current = self.prompt.value
        self.prompt.value = text if not current.strip() else f"{text}\n{current}"

    def start_turn(self, op: str, text: str | None = None, message_id: str | None = None) -> None:
        """Run a turn ("send", "edit" or "regenerate") in the turn worker; one at a time."""
        if self.streaming:
            self.notify(STREAMING, severity="warning")
            if op == "send" and text:
                self._restore(text)
            return
        self.streaming = True
        self._turn(op, text, message_id)

    @work(thread=True, group="turn", exit_on_error=False)
    def _turn(self, op: str, text: str | None, message_id: str | None) -> None:
        """Thread: store the message, then drain the reply stream into the view."""
        session, fresh = self.session, self.session is None
        try:
            if session is None:
                session = self._new_session(title=(text or "")[:48])
            if op == "send":
                gen = session.send(text or "")
            elif op == "edit":
                gen = session.edit(message_id or "", text or "")
            else:
                gen = session.regenerate()
            shown = session_rows(session)
            if op == "regenerate" and shown and shown[-1].role == "assistant":
                shown = shown[:-1]
        except Exception as exc:  # noqa: BLE001
            if fresh and session is not None:
                self._drop_new_session(session)  # refused before anything was stored: no empty session left
            self.call_from_thread(self._turn_failed, op, text, exc)
            return
        if fresh:
            self.call_from_thread(self._adopt, session)
        self.call_from_thread(self._turn_started, shown)
        last = None
        try:
            for ev in gen:
                if ev.text:
                    self.call_from_thread(self.view.write_reply, ev.message_id, ev.text)
                last = ev
        except Exception as exc:  # noqa: BLE001
            self.call_from_thread(self.show_error, exc, "Generation failed")
        info = meter_info(session, last.report if last is not None else None)
        self.call_from_thread(self._turn_done, session.id, session_rows(session), info,
                              last.finish_reason if last else None)

    def _new_session(self, title: str = "", system: str | None = None) -> ChatSession:
        """Thread: a new stored session, live on the loaded engine."""
        assert self.library is not None
        s = self.library.new_session(self.engine, title=title, system=system, window=self.window, pool=self.pool,
                                     **self.sampling)
        self.sessions[s.id] = s
        self._watch_saves(s)
        return s

    def _drop_new_session(self, session: ChatSession) -> None:
        """Thread: delete a session made for a first message that was then refused (it holds nothing)."""
        self.sessions.pop(session.id, None)
        if self.pool is not None:
            self.pool.discard(session.id)
        if self.library is not None:
            with contextlib.suppress(Exception):  # the refusal is what the user is told about
                self.library.delete(session.id)

    def _turn_failed(self, op: str, text: str | None, exc: BaseException) -> None:
        self.streaming = False
        self.turns += 1
        if op == "send" and text:
            self._restore(text)
        if isinstance(exc, MessageTooLong):  # its hint names a library option; say what can be done here
            reason = describe(exc).partition(";")[0]
            window = self.engine.window if self.engine is not None else 0
            most = getattr(getattr(self.engine, "config", None), "max_window", window)
            more = f", or restart with a larger --max-seq-len (the model takes {most:,})" if most > window else ""
            self.notify(f"{reason}; shorten it or send it in parts{more}. Your text stays in the input.",
                        title="Message not sent", severity="error", timeout=10)
            return
        self.show_error(exc, "Message not sent" if op == "send" else "Failed")

    async def _turn_started(self, shown: list[Row]) -> None:
        await self.view.show(shown)
        await self.view.start_reply()

    async def _turn_done(self, session_id: str, shown: list[Row], info: MeterInfo, finish: str | None) -> None:
        self.streaming = False
        self.turns += 1
        if session_id == self.session_id:
            await self.view.show(shown)
            self.query_one(ContextMeter).set_info(info)
        session = self.session
        if self._reshow_after_turn and session is not None:  # saved while it streamed: the rows may be stale
            self._reshow_after_turn = False
            meter = self.query_one(ContextMeter)
            meter.set_info(dataclasses.replace(meter.info, unsaved=len(session.unsaved)))
            self.bg(lambda: session_rows(session), partial(self._reshow, session.id), on_error=lambda exc: None)
        if finish == "cancelled":
            self.notify("Reply cancelled; the partial text is kept.")
        self.refresh_sessions()
        self._flush_pending()
