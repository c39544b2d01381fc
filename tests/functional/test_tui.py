"""Pilot tests of the first TUI screen against real workspaces."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import DataTable, Static

from appliance.workspace import ArtifactRecord, Workspace
from tui.app import ApplianceApp


async def _loaded(app: ApplianceApp, pilot) -> None:
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


async def test_empty_workspace_says_how_to_start(tmp_path: Path) -> None:
    app = ApplianceApp(Workspace(tmp_path / "none"))
    async with app.run_test(size=(80, 24)) as pilot:
        await _loaded(app, pilot)
        status = str(app.query_one("#status", Static).render())
        assert "0 models" in status and "appliance demo" in status
        assert app.query_one("#models", DataTable).row_count == 0
    assert not (tmp_path / "none").exists()  # looking does not create a workspace


async def test_workspace_with_model_and_dataset_is_listed(
        model_workspace: tuple[Workspace, ArtifactRecord]) -> None:
    from appliance import datasets
    from appliance.demo import sample_dataset

    ws, model = model_workspace
    datasets.import_file(ws, sample_dataset(), model, name="dolly")
    app = ApplianceApp(ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await _loaded(app, pilot)
        models = app.query_one("#models", DataTable)
        assert models.row_count == 1
        assert models.get_row_at(0)[:3] == [model.name, "LlamaForCausalLM", "134.5M"]
        sets = app.query_one("#datasets", DataTable)
        assert sets.get_row_at(0)[:3] == ["dolly", model.name, "dolly"]
        ws.remove("dataset", "dolly")
        await pilot.press("r")
        await _loaded(app, pilot)
        assert sets.row_count == 0
