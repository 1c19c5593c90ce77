"""The system prompt and parameter dialogs: nothing typed is lost, a bad value keeps the dialog open with the
error shown, reopening shows the current values."""

from __future__ import annotations

from typing import Any

from conftest import aio, notices, open_dialog, ready, send, wait_for


def type_fast(app: Any, text: str, then: str) -> None:
    """Keys as a terminal delivers them when typed quickly: all posted at once (the app does not wait for
    the focused widget to handle one before the next arrives), `then` last."""
    from textual import events

    for ch in text:
        app.post_message(events.Key("space" if ch == " " else ch, ch))
    app.post_message(events.Key(then, None))


@aio
async def test_text_typed_just_before_ctrl_s_is_saved(make_app: Any, store: Any) -> None:
    from textual.widgets import Input, TextArea

    from tui.screens import ParamsScreen, TextEditScreen

    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "hi")
        await open_dialog(pilot, "ctrl+o", TextEditScreen)
        type_fast(app, "Be brief", "ctrl+s")
        await wait_for(pilot, lambda: len(app.screen_stack) == 1)
        await wait_for(pilot, lambda: store.get_session(app.session_id).system_prompt is not None)
        assert store.get_session(app.session_id).system_prompt == "Be brief"
        await open_dialog(pilot, "ctrl+o", TextEditScreen)  # reopened: the prompt in use
        assert app.screen.query_one(TextArea).text == "Be brief"
        await pilot.press("escape")
        await wait_for(pilot, lambda: len(app.screen_stack) == 1)
        await open_dialog(pilot, "ctrl+g", ParamsScreen)
        app.screen.query_one("#p-top_k", Input).focus()
        type_fast(app, "3", "ctrl+s")
        await wait_for(pilot, lambda: store.get_session(app.session_id).sampling.get("top_k") is not None)
        assert store.get_session(app.session_id).sampling["top_k"] == 3
        assert not [n for n in notices(app) if "must" in n]


@aio
async def test_a_bad_parameter_keeps_the_dialog_open_and_reopening_shows_the_values(make_app: Any,
                                                                                   store: Any) -> None:
    from textual.widgets import Input, Label

    from tui.screens import ParamsScreen

    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "hi")
        await open_dialog(pilot, "ctrl+g", ParamsScreen)
        form = app.screen
        field = {n: form.query_one(f"#p-{n}", Input) for n in ("temperature", "top_p", "max_new_tokens",
                                                               "repetition_penalty", "seed", "top_k")}
        assert field["temperature"].value == "0.0" and field["max_new_tokens"].value == "12"  # the stored values
        assert field["top_p"].value == "1.0" and field["repetition_penalty"].value == "1.0"  # the defaults in use
        assert field["seed"].value == ""  # None: a random seed
        field["top_p"].value = "2"  # parses, but SamplingParams refuses it
        field["repetition_penalty"].value = "1.3"
        await pilot.press("ctrl+s")
        await pilot.pause(0.2)
        assert app.screen is form and field["repetition_penalty"].value == "1.3"
        assert "top_p" in str(form.query_one("#error", Label).render())
        field["top_p"].value = "0.9"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: store.get_session(app.session_id).sampling.get("top_p") == 0.9)
        sampling = store.get_session(app.session_id).sampling
        assert sampling["repetition_penalty"] == 1.3 and "top_k" not in sampling  # unchanged fields not stored
        again = await open_dialog(pilot, "ctrl+g", ParamsScreen)
        assert again is not form                                          # a new form, filled from storage
        assert again.query_one("#p-top_p", Input).value == "0.9"
        assert again.query_one("#p-repetition_penalty", Input).value == "1.3"
        assert again.query_one("#p-max_new_tokens", Input).value == "12"
