"""The cockpit's shell: navigation by keys and palette, the generated help, errors, placeholders."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import Static
from tuikit import app_for, no_gpu_probe, settle, wait_for

from appliance.errors import ApplianceError
from appliance.workspace import Workspace
from tui.app import SCREENS, ApplianceApp, screen_bindings
from tui.screens.help import render_sections, sections


async def test_number_keys_reach_every_screen_and_nothing_creates_the_workspace(tmp_path: Path
                                                                                ) -> None:
    app = app_for(Workspace(tmp_path / "none"), probe=no_gpu_probe)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        counts = str(app.screen.query_one("#counts", Static).render())
        assert "not created yet" in counts and "imports the default model" in counts
        assert "no GPU (nvidia-smi not found)" in str(app.screen.query_one("#system", Static).render())
        for entry in SCREENS:
            await pilot.press(entry.key)
            await settle(app, pilot)
            assert app.current_mode == entry.mode
            assert type(app.screen).__name__ == entry.cls
            if entry.mode == "chat":  # Chat puts the cursor in its prompt: leave it first
                await pilot.press("escape")  # (elsewhere escape goes back a screen)
    assert not (tmp_path / "none").exists()  # looking does not create a workspace


async def test_server_screen_on_a_new_box(tmp_path: Path) -> None:
    app = app_for(Workspace(tmp_path / "none"), probe=no_gpu_probe)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("8")
        await settle(app, pilot)
        texts = " ".join(str(s.render()) for s in app.screen.query(Static))
        assert "No server running" in texts and "no active API key" in texts
    assert not (tmp_path / "none").exists()  # looking does not create a workspace


def test_help_lists_every_key_of_every_screen() -> None:
    text = render_sections(ApplianceApp).plain
    headings = [heading for _, heading, _ in sections(ApplianceApp)]
    for entry in SCREENS:
        assert f"{entry.key} {entry.title}" in headings
        for binding in screen_bindings(entry.load()):
            assert binding.description in text, (entry.title, binding.description)
    for heading in ("Dialog: import a model", "Dialog: import a dataset", "Dialog: export a run",
                    "Dialog: pick a file", "Dialog: a confirmation"):
        assert heading in headings
    assert "ctrl+s" in text and "Start training" in text and "Cancel job" in text


async def test_help_screen_opens_and_closes(tmp_path: Path) -> None:
    app = app_for(Workspace(tmp_path / "none"), probe=no_gpu_probe)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("question_mark")
        await settle(app, pilot)
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape")
        await settle(app, pilot)
        assert app.current_mode == "dashboard" and type(app.screen).__name__ == "DashboardScreen"


async def test_palette_offers_every_screen_and_action_and_runs_them(tmp_path: Path) -> None:
    app = app_for(Workspace(tmp_path / "none"), probe=no_gpu_probe)
    async with app.run_test(size=(80, 24)) as pilot:
        titles = {c.title for c in app.get_system_commands(app.screen)}
        for entry in SCREENS:
            assert f"Go to {entry.title}" in titles
            for binding in screen_bindings(entry.load()):
                assert f"{entry.title}: {binding.description}" in titles
        helps = " ".join(c.help for c in app.get_system_commands(app.screen))
        assert "key / on the" in helps  # keys as the footer writes them, not Textual's names
        assert "slash" not in helps and "super+" not in helps
        await pilot.press("ctrl+p")
        await settle(app, pilot)
        await pilot.press(*"Go to Exports")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.current_mode == "exports", 10, "the Exports screen")


async def test_palette_action_runs_on_its_screen(tmp_path: Path) -> None:
    app = app_for(Workspace(tmp_path / "none"), probe=no_gpu_probe)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.run_screen_action("models", "import_path")
        await settle(app, pilot)
        assert app.current_mode == "models"
        assert type(app.screen).__name__ == "ImportModelDialog"


async def test_errors_show_their_title_and_what_to_do(tmp_path: Path) -> None:
    app = app_for(Workspace(tmp_path / "none"), probe=no_gpu_probe)
    async with app.run_test(size=(80, 24)) as pilot:
        app.show_error(ApplianceError("the disk is full", title="Out of space",
                                      hint="free space under /srv"), modal=True)
        await settle(app, pilot)
        dialog = app.screen
        assert type(dialog).__name__ == "ErrorDialog"
        shown = " ".join(str(s.render()) for s in dialog.query(Static))
        assert "Out of space" in str(dialog.query_one(".title").render())
        assert "the disk is full" in shown and "free space under /srv" in shown
        await pilot.press("escape")
        await settle(app, pilot)
        assert type(app.screen).__name__ == "DashboardScreen"
        app.show_error(RuntimeError("boom"), title="Could not read the workspace")
        await settle(app, pilot)
        notes = list(app._notifications)
        assert notes and notes[-1].title == "Could not read the workspace (RuntimeError)"


async def test_a_worker_failure_becomes_a_notification_not_a_crash(tmp_path: Path) -> None:
    def broken_probe(_: Workspace):
        raise OSError("nvidia-smi hung")

    app = app_for(Workspace(tmp_path / "none"), probe=broken_probe)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        notes = list(app._notifications)
        assert any("nvidia-smi hung" in n.message for n in notes)
        assert app.is_running
