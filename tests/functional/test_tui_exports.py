"""Exports: verdicts in the list, the parity table per artifact, and the merge / export / verify
jobs the dialogs queue (the job runner itself is tested in tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Select, SelectionList, Static
from tuikit import RUN, app_for, build_fixed_workspace, screen_text, settle, wait_for

from appliance import jobs
from appliance.workspace import Workspace
from tui.widgets import KeyedTable


@pytest.fixture
def fixed_ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    monkeypatch.setattr(jobs, "spawn", lambda ws, job_id: 0)
    return build_fixed_workspace(tmp_path)


def _queued(ws: Workspace, kind: str) -> dict:
    return next(j.params for j in jobs.list_jobs(ws) if j.kind == kind and j.state == "queued")


async def test_list_verdicts_and_parity_table(fixed_ws: Workspace) -> None:
    app = app_for(fixed_ws)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("6")
        await settle(app, pilot)
        table = app.screen.query_one("#exports", KeyedTable)
        verdicts = {str(table.get_row_at(i)[0]): str(table.get_row_at(i)[3])
                    for i in range(table.row_count)}
        assert verdicts == {f"{RUN}-gguf-q4_k_m": "FAIL", f"{RUN}-gguf-q8_0": "pass",
                            f"{RUN}-merged": "reference", f"{RUN}-onnx-int4": "pass"}
        text = screen_text(app)
        assert "support-run-gguf-q4_k_m  q4_k_m  6.610  +11.53%" in text
        assert "FAIL" in text and "perplexity +11.53% > +6.00%; KL 0.1624 > 0.12" in text
        await pilot.press("down")
        await settle(app, pilot)
        assert table.selected_key() == f"{RUN}-gguf-q8_0"
        await wait_for(pilot, lambda: f"{RUN}-gguf-q8_0  (ready)" in screen_text(app), 10,
                       "the q8_0 details")
        row = next(line for line in screen_text(app).splitlines() if "q8_0  " in line and "%" in line)
        assert row.split()[-7:-1] == ["5.960", "+0.55%", "0.0039", "97.34%", "same", "pass"]


async def test_dialogs_queue_merge_export_and_verify_jobs(fixed_ws: Workspace) -> None:
    app = app_for(fixed_ws, poll_s=0.3)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("6", "e")
        await settle(app, pilot)
        dialog = app.screen
        assert list(dialog.query_one("#types", SelectionList).selected) == ["Q8_0", "Q4_K_M"]
        dialog.query_one("#format", Select).value = "onnx"
        await settle(app, pilot)
        assert list(dialog.query_one("#types", SelectionList).selected) == ["int4"]
        dialog.query_one("#go").press()
        await settle(app, pilot)
        assert _queued(fixed_ws, "export") == {"run": RUN, "format": "onnx", "types": ["int4"],
                                               "overrides": {}}
        await pilot.press("m")
        await settle(app, pilot)
        app.screen.query_one("#base", Select).value = "nf4"
        app.screen.query_one("#go").press()
        await settle(app, pilot)
        assert _queued(fixed_ws, "merge") == {"run": RUN, "base": "nf4", "dtype": "auto"}
        await pilot.press("v")
        await settle(app, pilot)
        assert _queued(fixed_ws, "verify") == {"export": f"{RUN}-gguf-q4_k_m", "overrides": {}}
        activity = app.screen.query_one("#activity", Static)
        await wait_for(pilot, lambda: activity.display and "verify" in str(activity.render()), 10,
                       "the queued jobs in the activity line")


async def test_delete_asks_first(fixed_ws: Workspace) -> None:
    app = app_for(fixed_ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("6")
        await settle(app, pilot)
        await pilot.press("x")
        await settle(app, pilot)
        await pilot.press("y")
        await settle(app, pilot)
        assert not fixed_ws.artifact_dir("export", f"{RUN}-gguf-q4_k_m").exists()
        table = app.screen.query_one("#exports", KeyedTable)
        assert table.row_count == 3
        fixed_ws.remove("export", f"{RUN}-merged")  # from the CLI, say: r shows it
        await pilot.press("r")
        await settle(app, pilot)
        assert table.row_count == 2
