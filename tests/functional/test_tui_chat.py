"""The Chat screen on real GGUF exports (the embedded SmolLM2 registered as two exports): an answer
streams in, a long one is stopped from the keyboard, two artifacts answer the same prompt side by
side, and a failed-parity export opens only when allowed."""

from __future__ import annotations

from typing import Any

import pytest
from textual.widgets import Checkbox, Input, Select, Static
from tuikit import app_for, gguf_export, settle, wait_for

from appliance.workspace import Workspace
from tests.tmpdirs import ModuleTemp
from tui.screens.chat import ChatScreen

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def chat_ws(module_tmp: ModuleTemp) -> Workspace:
    ws = Workspace(module_tmp.mktemp("chat") / "ws").ensure()
    gguf_export(ws, "smol-a")
    gguf_export(ws, "smol-b")
    gguf_export(ws, "smol-broken", status="failed")
    return ws


def _pane_text(screen: ChatScreen, pane: str) -> str:
    return "\n".join(str(s.render()) for s in screen.query_one(f"#pane-{pane}").query(Static))


async def _say(app: Any, pilot: Any, text: str) -> None:
    prompt = app.screen.query_one("#prompt", Input)
    prompt.focus()
    prompt.value = text
    await pilot.press("enter")


async def test_answer_streams_and_stops(chat_ws: Workspace) -> None:
    app = app_for(chat_ws)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("7")
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, ChatScreen)
        assert screen.query_one("#artifact", Select).value == "smol-a"
        screen.query_one("#temperature", Input).value = "0"
        await _say(app, pilot, "What is 2 + 2?")
        await wait_for(pilot, lambda: "tokens" in _pane_text(screen, "a") and not screen.busy,
                       timeout=120, what="an answer")
        assert "smol-a> " in _pane_text(screen, "a") and "4" in _pane_text(screen, "a")
        assert [m["role"] for m in screen.panes["a"].messages] == ["user", "assistant"]
        screen.query_one("#max-tokens", Input).value = "400"
        await _say(app, pilot, "Tell me a very long story about the sea.")
        await wait_for(pilot, lambda: len(screen.panes["a"].messages) == 3 and
                       _pane_text(screen, "a").count("smol-a> ") == 2, timeout=60, what="streaming")
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: not screen.busy, timeout=60, what="the stop")
        assert "[stopped]" in _pane_text(screen, "a")
        await _say(app, pilot, "Thanks!")  # the chat goes on after a stop
        await wait_for(pilot, lambda: len(screen.panes["a"].messages) == 6 and not screen.busy,
                       timeout=120, what="a third answer")


async def test_two_artifacts_side_by_side_and_the_parity_gate(chat_ws: Workspace) -> None:
    app = app_for(chat_ws)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.press("7")
        await settle(app, pilot)
        screen = app.screen
        screen.query_one("#compare", Select).value = "smol-b"
        screen.query_one("#temperature", Input).value = "0"
        await settle(app, pilot)
        assert screen.query_one("#pane-b").display
        await _say(app, pilot, "What is 2 + 2?")
        await wait_for(pilot, lambda: not screen.busy and "tokens" in _pane_text(screen, "b"),
                       timeout=180, what="both answers")
        answer_a = screen.panes["a"].messages[-1]["content"]
        assert answer_a and answer_a == screen.panes["b"].messages[-1]["content"]  # same model, greedy
        screen.query_one("#compare", Select).value = "smol-broken"
        await settle(app, pilot)
        await _say(app, pilot, "Hello")
        await wait_for(pilot, lambda: not screen.busy, timeout=60, what="the refusal")
        assert "failed its parity gate" in " ".join(str(s.render()) for s in app.screen.query(Static))
        await pilot.press("escape")  # close the error dialog
        await settle(app, pilot)
        app.screen.query_one("#allow-failed", Checkbox).value = True
        await _say(app, pilot, "Hello")
        await wait_for(pilot, lambda: not app.screen.busy and "tokens" in _pane_text(app.screen, "b"),
                       timeout=180, what="the allowed answer")


async def test_the_conversation_survives_a_trip_to_other_screens(chat_ws: Workspace) -> None:
    """Transcript, history, chosen artifact and loaded engine stay; only ctrl+r starts over."""
    app = app_for(chat_ws)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("7")
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, ChatScreen)
        screen.query_one("#artifact", Select).value = "smol-b"
        screen.query_one("#temperature", Input).value = "0"
        await settle(app, pilot)
        await _say(app, pilot, "What is 2 + 2?")
        await wait_for(pilot, lambda: "tokens" in _pane_text(screen, "a") and not screen.busy,
                       timeout=120, what="an answer")
        transcript, engine = _pane_text(screen, "a"), screen.engines["smol-b"]
        for keys in (("escape", "1"), ("5",), ("6",), ("alt+2",), ("alt+7",)):
            await pilot.press(*keys)
            await settle(app, pilot)
        assert app.current_mode == "chat" and app.screen is screen
        assert _pane_text(screen, "a") == transcript
        assert [m["role"] for m in screen.panes["a"].messages] == ["user", "assistant"]
        assert screen.query_one("#artifact", Select).value == "smol-b"
        assert screen.engines["smol-b"] is engine
        await _say(app, pilot, "And 3 + 3?")  # the conversation goes on where it was
        await wait_for(pilot, lambda: len(screen.panes["a"].messages) == 4 and not screen.busy,
                       timeout=120, what="a second answer")
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        assert screen.panes["a"].messages == [] and "you>" not in _pane_text(screen, "a")


async def test_a_bad_sampling_field_names_the_field_and_its_range(chat_ws: Workspace) -> None:
    app = app_for(chat_ws)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("7")
        await settle(app, pilot)
        screen = app.screen
        for field, value, expected in (("#max-tokens", "abc", "max tokens"),
                                       ("#temperature", "hot", "temperature")):
            screen.query_one("#max-tokens", Input).value = "256"
            screen.query_one(field, Input).value = value
            await _say(app, pilot, "Hello")
            await settle(app, pilot)
            note = list(app._notifications)[-1]
            assert expected in note.message and repr(value) in note.message
            assert "invalid literal" not in note.message and "could not convert" not in note.message
            assert screen.query_one(field, Input).has_class("-invalid")
            assert screen.panes["a"].messages == []  # nothing was sent
            screen.query_one(field, Input).value = "0.7" if field == "#temperature" else "256"
