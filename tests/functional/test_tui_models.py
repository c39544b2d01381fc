"""Models: list and details of the real SmolLM2, delete with confirmation, import through the file
picker, and importing the embedded default model as a real job from the UI."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Input, Static
from tuikit import app_for, settle, wait_for

from appliance import jobs, stack
from appliance.workspace import ArtifactRecord, Workspace
from tui.dialogs import FilteredTree
from tui.widgets import KeyedTable


async def test_details_then_delete_with_confirmation(
        model_workspace: tuple[Workspace, ArtifactRecord]) -> None:
    ws, model = model_workspace
    app = app_for(ws)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("2")
        await settle(app, pilot)
        table = app.screen.query_one("#models", KeyedTable)
        assert table.get_row_at(0)[:3] == [model.name, "LlamaForCausalLM", "134.5M"]
        details = str(app.screen.query_one("#details", Static).render())
        for expected in ("architecture   LlamaForCausalLM (llama)", "context        8192",
                         "stop tokens    <|im_end|>", "chat template", "im_start",
                         "model.safetensors", "(sha256)"):
            assert expected in details, expected
        await pilot.press("x")
        await settle(app, pilot)
        assert type(app.screen).__name__ == "ConfirmDialog"
        await pilot.press("n")  # kept
        await settle(app, pilot)
        assert ws.artifact_dir("model", model.name).exists()
        await pilot.press("x")
        await settle(app, pilot)
        await pilot.press("y")
        await settle(app, pilot)
        assert not ws.artifact_dir("model", model.name).exists()
        assert table.row_count == 0


async def test_import_through_the_file_picker_queues_an_import_job(
        workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "spawn", lambda ws, job_id: 0)  # the job runner is tested elsewhere
    models_dir = tmp_path / "incoming"
    (models_dir / "hf-folder").mkdir(parents=True)
    (models_dir / "model.Q8_0.gguf").write_bytes(b"GGUF")
    (models_dir / "notes.txt").write_text("not a model")
    app = app_for(workspace, browse_from=models_dir)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2", "i")
        await settle(app, pilot)
        await pilot.press("tab", "enter")  # from the path field to Browse…
        await settle(app, pilot)
        tree = app.screen.query_one(FilteredTree)
        names = sorted(str(node.label) for node in tree.root.children)
        assert names == ["hf-folder", "model.Q8_0.gguf"]  # folders and .gguf only
        gguf = next(n for n in tree.root.children if str(n.label).endswith(".gguf"))
        tree.move_cursor(gguf)
        await pilot.press("enter")
        await settle(app, pilot)
        assert app.screen.query_one("#path", Input).value == str(models_dir / "model.Q8_0.gguf")
        await pilot.press("enter")  # Import (focused after picking)
        await settle(app, pilot)
    [job] = jobs.list_jobs(workspace)
    assert job.kind == "import-model" and job.state == "queued"
    assert job.params == {"default": False, "path": str(models_dir / "model.Q8_0.gguf"),
                          "name": None, "chat_template": None}


async def test_a_path_that_does_not_exist_is_shown_at_its_field_and_queues_nothing(
        workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "spawn", lambda ws, job_id: 0)
    app = app_for(workspace, browse_from=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2", "i")
        await settle(app, pilot)
        dialog = app.screen
        dialog.query_one("#path", Input).value = str(tmp_path / "no-such-model")
        dialog.query_one("#name", Input).value = "bad name"
        await pilot.press("enter")
        await settle(app, pilot)
        assert app.screen is dialog  # still open, each problem at its field
        assert dialog.query_one("#path", Input).has_class("-invalid")
        assert dialog.query_one("#name", Input).has_class("-invalid")
        assert not dialog.query_one("#template", Input).has_class("-invalid")
        problems = [str(p.render()) for p in dialog.query(".problem")]
        assert problems[0].startswith("✗ path: ") and "no-such-model does not exist" in problems[0]
        assert problems[1].startswith("✗ name: invalid model name 'bad name'")
        assert jobs.list_jobs(workspace) == []


@pytest.mark.skipif(not (stack.share_dir() / "models" / stack.DEFAULT_MODEL_FILE).exists(),
                    reason="the embedded default model is not installed (make setup)")
async def test_import_the_embedded_default_model_from_the_ui(workspace: Workspace) -> None:
    app = app_for(workspace, poll_s=0.5)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2", "d")
        await settle(app, pilot)
        table = app.screen.query_one("#models", KeyedTable)
        activity = app.screen.query_one("#activity", Static)
        await wait_for(pilot, lambda: activity.display, 20, "the import job's activity line")
        assert "import-model" in str(activity.render())
        await wait_for(pilot, lambda: table.row_count == 1, 300, "the imported model")
        assert table.get_row_at(0)[:2] == [stack.DEFAULT_MODEL_NAME, "LlamaForCausalLM"]
        await wait_for(pilot, lambda: not activity.display, 10, "the activity line to clear")
        await pilot.press("d")  # again: refused with a reason, before any job starts
        await settle(app, pilot)
        assert type(app.screen).__name__ == "ErrorDialog"
    assert [j.state for j in jobs.list_jobs(workspace)] == ["succeeded"]
