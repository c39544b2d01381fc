"""Keys an operator brings from lazygit, k9s or Posting: navigation that works while a text box
has focus, `/` to filter a list, `j`/`k`/`g`/`G` in lists, `esc` to go back, help that opens at
the current screen, a theme that persists; and focus and ticks visible without colour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from textual.widgets import Input, SelectionList
from tuikit import (
    MODEL,
    add_model,
    app_for,
    build_fixed_workspace,
    dataset_file,
    screen_text,
    settle,
)

from appliance.stages.datasets import importer as datasets
from appliance.workspace import Workspace
from tests.tmpdirs import ModuleTemp
from tui.app import ApplianceApp, Settings
from tui.widgets import KeyedTable


@pytest.fixture(scope="module")
def fixed_ws(module_tmp: ModuleTemp) -> Workspace:
    """The snapshot workspace plus a second model and dataset, so a filter has something to hide."""
    root = module_tmp.mktemp("conventions")
    ws = build_fixed_workspace(root)
    add_model(ws, "qwen-tiny")
    datasets.import_file(ws, dataset_file(root), ws.get("model", MODEL), name="other-chats",
                         eval_fraction=0.25)
    return ws


# -- navigation with a text box focused ---------------------------------------------------------
async def test_alt_digits_navigate_while_a_text_box_has_focus(fixed_ws: Workspace) -> None:
    app = app_for(fixed_ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("7")
        await settle(app, pilot)
        prompt = app.screen.query_one("#prompt", Input)
        assert app.screen.focused is prompt  # Chat opens in its prompt
        await pilot.press("1", "q")  # plain digits and q type into the box ...
        await settle(app, pilot)
        assert app.current_mode == "chat" and prompt.value == "1q" and app.is_running
        await pilot.press("alt+5")  # ... alt+digit always navigates
        await settle(app, pilot)
        assert app.current_mode == "jobs"
        await pilot.press("alt+4")
        await settle(app, pilot)
        field = app.screen.query_one("#f-max_steps", Input)
        field.focus()
        field.value = ""
        await pilot.press("2", "5")
        await settle(app, pilot)
        assert app.current_mode == "train" and field.value == "25"
        await pilot.press("alt+2")
        await settle(app, pilot)
        assert app.current_mode == "models"
        await pilot.press("alt+7")
        await settle(app, pilot)
        assert app.screen.query_one("#prompt", Input).value == "1q"  # the screen was kept


async def test_the_navigation_bar_says_which_keys_work_now(fixed_ws: Workspace) -> None:
    app = app_for(fixed_ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        bar = screen_text(app).splitlines()[1]
        assert bar.startswith(" 1 Dashboard") and bar.rstrip().endswith("8 Server 9 Eval")
        await pilot.press("7")
        await settle(app, pilot)
        bar = screen_text(app).splitlines()[1]
        assert bar.lstrip().startswith("alt+") and "9 Eval" in bar and len(bar.rstrip()) <= 80
        assert "1 Dash 2 Models 3 Data" in bar  # the short titles: nine screens and alt+ fit 80


@pytest.mark.parametrize("key", ["2", "3", "6"])
async def test_the_bar_says_alt_while_a_filter_box_has_the_focus(fixed_ws: Workspace, key: str) -> None:
    app = app_for(fixed_ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press(key)
        await settle(app, pilot)
        await pilot.press("slash")
        await settle(app, pilot)
        assert isinstance(app.screen.focused, Input)
        bar = screen_text(app).splitlines()[1]
        assert bar.lstrip().startswith("alt+"), bar


# -- / filters every list -----------------------------------------------------------------------
FILTERS = [  # screen key, table id, rows before, what to type, the rows it keeps
    ("2", "models", 2, "qwen", ["qwen-tiny"]),
    ("3", "datasets", 2, "other", ["other-chats"]),
    ("5", "jobs", 4, "export", ["20261122-110000-export-0a1b2c"]),
    ("6", "exports", 4, "q8", ["support-run-gguf-q8_0"]),
]


def _keys(table: KeyedTable) -> list[str]:
    return [str(table.coordinate_to_cell_key((i, 0)).row_key.value) for i in range(table.row_count)]


@pytest.mark.parametrize(("key", "table_id", "before", "typed", "kept"), FILTERS,
                         ids=[f[1] for f in FILTERS])
async def test_slash_filters_the_list_and_escape_clears_it_then_goes_back(
        fixed_ws: Workspace, key: str, table_id: str, before: int, typed: str, kept: list[str]
        ) -> None:
    app = app_for(fixed_ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press(key)
        await settle(app, pilot)
        table = app.screen.query_one(f"#{table_id}", KeyedTable)
        assert table.row_count == before
        await pilot.press("slash")
        await settle(app, pilot)
        box = app.screen.query_one("#filter", Input)
        assert box.display and app.screen.focused is box
        await pilot.press(*typed)
        await settle(app, pilot)
        assert _keys(table) == kept
        await pilot.press("enter")  # keeps the filter, back in the list
        await settle(app, pilot)
        assert app.screen.focused is table and _keys(table) == kept
        assert table.selected_key() == kept[0]
        app.screen.reload()  # a poll or a refresh keeps the filter
        await settle(app, pilot)
        assert _keys(table) == kept
        await pilot.press("escape")  # clears the filter
        await settle(app, pilot)
        assert table.row_count == before and not box.display
        await pilot.press("escape")  # then goes back where we came from
        await settle(app, pilot)
        assert app.current_mode == "dashboard"


async def test_a_filter_matching_nothing_says_so(fixed_ws: Workspace) -> None:
    app = app_for(fixed_ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("6", "slash", *"nothing-like-this")
        await settle(app, pilot)
        assert app.screen.query_one("#exports", KeyedTable).row_count == 0
        assert "0 of 4" in screen_text(app)


async def test_j_k_g_G_move_in_lists(fixed_ws: Workspace) -> None:
    app = app_for(fixed_ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("6")
        await settle(app, pilot)
        table = app.screen.query_one("#exports", KeyedTable)
        table.focus()
        rows = _keys(table)
        await pilot.press("j", "j")
        assert table.selected_key() == rows[2]
        await pilot.press("k")
        assert table.selected_key() == rows[1]
        await pilot.press("G")
        assert table.selected_key() == rows[-1]
        await pilot.press("g")
        assert table.selected_key() == rows[0]


async def test_escape_walks_back_through_the_screens_visited(fixed_ws: Workspace) -> None:
    app = app_for(fixed_ws)
    async with app.run_test(size=(80, 24)) as pilot:
        for key in ("2", "6", "5"):
            await pilot.press(key)
            await settle(app, pilot)
        await pilot.press("escape")
        await settle(app, pilot)
        assert app.current_mode == "exports"
        await pilot.press("escape")
        await settle(app, pilot)
        assert app.current_mode == "models"
        await pilot.press("7")  # Chat's prompt: the first escape leaves the box
        await settle(app, pilot)
        await pilot.press("escape")
        await settle(app, pilot)
        assert app.current_mode == "chat" and app.screen.focused is None
        await pilot.press("escape")
        await settle(app, pilot)
        assert app.current_mode == "models"


# -- help -----------------------------------------------------------------------------------------
async def test_help_opens_at_the_current_screen_and_filters(fixed_ws: Workspace) -> None:
    app = app_for(fixed_ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("5")
        await settle(app, pilot)
        await pilot.press("question_mark")
        await settle(app, pilot)
        lines = screen_text(app).splitlines()
        assert any(line.strip("█ ").startswith("5 Jobs") for line in lines[:6]), lines[:6]
        assert "Cancel job" in "\n".join(lines)
        await pilot.press("slash", *"resume")
        await settle(app, pilot)
        text = screen_text(app)
        assert "Resume job" in text and "Go to" not in text and "Delete" not in text
        await pilot.press("escape")  # clears the help's filter
        await settle(app, pilot)
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape")
        await settle(app, pilot)
        assert app.current_mode == "jobs" and type(app.screen).__name__ == "JobsScreen"


async def test_navigation_from_the_help_closes_it_and_dialogs_keep_their_screen(
        fixed_ws: Workspace) -> None:
    app = app_for(fixed_ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f1")
        await settle(app, pilot)
        await pilot.press("alt+5")
        await settle(app, pilot)
        assert app.current_mode == "jobs" and type(app.screen).__name__ == "JobsScreen"
        await pilot.press("alt+2", "x")  # a question waits for its answer: no navigation
        await settle(app, pilot)
        await pilot.press("alt+6")
        await settle(app, pilot)
        assert app.current_mode == "models" and type(app.screen).__name__ == "ConfirmDialog"
        await pilot.press("n", "escape")
        await settle(app, pilot)
        assert app.current_mode == "jobs" and type(app.screen).__name__ == "JobsScreen"


def test_help_says_the_shared_keys_once() -> None:
    from tui.screens.help import render_sections

    text = render_sections(ApplianceApp).plain
    assert text.count("Refresh") == 1 and text.count("Filter\n") == 1
    assert "alt+1" in text


# -- theme ----------------------------------------------------------------------------------------
async def test_the_theme_choice_persists(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "none")
    prefs = tmp_path / "config" / "tui.json"
    app = ApplianceApp(ws, Settings(poll_s=0, server_probe=None, prefs_path=prefs))
    async with app.run_test(size=(80, 24)) as pilot:
        assert app.theme != "nord"
        app.theme = "nord"
        await settle(app, pilot)
    assert json.loads(prefs.read_text())["theme"] == "nord"
    again = ApplianceApp(ws, Settings(poll_s=0, server_probe=None, prefs_path=prefs))
    async with again.run_test(size=(80, 24)) as pilot:
        await settle(again, pilot)
        assert again.theme == "nord"
    prefs.write_text("{not json")  # a broken file is ignored, not fatal
    broken = ApplianceApp(ws, Settings(poll_s=0, server_probe=None, prefs_path=prefs))
    async with broken.run_test(size=(80, 24)) as pilot:
        await settle(broken, pilot)
        assert broken.is_running


# -- focus and ticks without colour ---------------------------------------------------------------
async def test_focus_and_ticks_show_without_colour(fixed_ws: Workspace) -> None:
    app = app_for(fixed_ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("4")
        await settle(app, pilot)
        app.screen.query_one("#f-lora_r", Input).focus()
        await settle(app, pilot)
        text = screen_text(app)
        assert "▸ lora_r" in text and "▸ max_steps" not in text
        assert "[ ] start anyway" in text
        app.screen.query_one("#force").value = True
        await settle(app, pilot)
        assert "[X] start anyway" in screen_text(app)
        await pilot.press("alt+6", "e")
        await settle(app, pilot)
        types = app.screen.query_one("#types", SelectionList)
        assert set(types.selected) == {"Q8_0", "Q4_K_M"}
        text = screen_text(app)
        assert "[X] Q8_0" in text and "[ ] F16" in text and "[X] Q4_K_M" in text



@pytest.mark.parametrize("digit", list("12345678"))
def test_a_terminal_s_alt_digit_reaches_the_app_as_alt_digit(digit: str) -> None:
    """What tmux and xterm send for alt+N (ESC, then the digit) through Textual's real input parser:
    before the fix it became a macOS Option character (alt+8 -> '•') that typed into the chat."""
    from textual._xterm_parser import XTermParser

    from tui.app import let_alt_digits_through

    let_alt_digits_through()
    parser = XTermParser()
    events = [*parser.feed(f"\x1b{digit}"), *parser.feed("")]  # "" ends the lone escape sequence
    keys = [getattr(e, "key", None) for e in events]
    assert f"alt+{digit}" in keys, keys
