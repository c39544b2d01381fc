"""Datasets: import a file for the real SmolLM2 from the UI, see its validation report, preview a
conversation rendered with the model's template with the trained spans highlighted."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.widgets import Input, Static
from tuikit import app_for, dataset_file, settle, wait_for

from appliance.workspace import ArtifactRecord, Workspace
from tui.screens.datasets import TRAINED_STYLE
from tui.widgets import KeyedTable


async def test_import_report_and_preview(model_workspace: tuple[Workspace, ArtifactRecord],
                                         tmp_path: Path) -> None:
    ws, model = model_workspace
    source = dataset_file(tmp_path)
    app = app_for(ws, browse_from=tmp_path)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("3", "i")
        await settle(app, pilot)
        dialog = app.screen
        dialog.query_one("#path", Input).value = str(source)
        dialog.query_one("#name", Input).value = "support"
        dialog.query_one("#path", Input).focus()
        await pilot.press("enter")
        screen = app.screen
        table = screen.query_one("#datasets", KeyedTable)
        await wait_for(pilot, lambda: table.row_count == 1, 120, "the imported dataset")
        await settle(app, pilot)
        assert table.get_row_at(0) == ["support", model.name, "messages", "11", "1", "4", "1"]
        report = str(screen.query_one("#report", Static).render())
        for expected in ("17 lines → 12 kept (11 train / 1 eval), 4 rejected, 1 exact duplicates",
                         "length histogram", "line 6: bad JSON", "unknown role 'robot'",
                         "empty content in message 1", "line 7: duplicate of line 4"):
            assert expected in report, expected

        await pilot.press("p")
        preview = app.screen
        body = preview.query_one("#preview", Static)
        await wait_for(pilot, lambda: "conversation 1/11" in str(body.render()), 60, "the preview")
        text = body.content
        assert isinstance(text, Text)
        trained = "".join(text.plain[s.start:s.end] for s in text.spans if s.style == TRAINED_STYLE
                          and s.start > len("conversation"))
        assert "Hold the button" in trained and "<|im_end|>" in trained
        assert "How do I reset" not in trained  # user turns are not trained
        await pilot.press("n")
        await wait_for(pilot, lambda: "conversation 2/11" in str(body.render()), 30, "the next one")
        await pilot.press("escape")
        await settle(app, pilot)
        assert type(app.screen).__name__ == "DatasetsScreen"


async def test_import_without_models_says_what_to_do_first(workspace: Workspace) -> None:
    app = app_for(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3", "i")
        await settle(app, pilot)
        assert type(app.screen).__name__ == "DatasetsScreen"
        assert any("import a model first" in n.message for n in app._notifications)


async def test_a_file_with_nothing_usable_is_refused_in_a_dialog(
        model_workspace: tuple[Workspace, ArtifactRecord], tmp_path: Path) -> None:
    ws, _ = model_workspace
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\nnot json\n', encoding="utf-8")
    app = app_for(ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3", "i")
        await settle(app, pilot)
        app.screen.query_one("#path", Input).value = str(bad)
        await pilot.press("enter")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "ErrorDialog", 60, "the error")
        shown = " ".join(str(s.render()) for s in app.screen.query(Static))
        assert "no usable conversations" in shown and "line 2: bad JSON" in shown
        assert "every rejected line is listed" in shown  # the hint
