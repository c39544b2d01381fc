"""Exports: verdicts in the list, the parity table per artifact, the merge / export / verify
jobs the dialogs queue, and the progress of a running export (the job runner itself is tested in
tests/integration; here a job's events are written the way the job functions write them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from textual.widgets import Select, SelectionList, Static
from tuikit import RUN, app_for, build_fixed_workspace, check_snapshot, screen_text, settle, wait_for

from appliance import jobs
from appliance.progress import Stages
from appliance.workspace import Workspace
from tui.widgets import KeyedTable

EXPORT_JOB = "20261122-120000-export-c0ffee"
Q8, Q4 = f"{RUN}-gguf-q8_0", f"{RUN}-gguf-q4_k_m"


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
        verdicts = {str(table.get_row_at(i)[0]): str(table.get_row_at(i)[1])
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
        lines = [line.strip("│ ") for line in screen_text(app).splitlines()]
        row = next(line for line in lines if "q8_0  " in line and "%" in line)
        assert row.split()[-7:] == ["5.960", "+0.55%", "0.0039", "97.34%", "same", "41.3", "pass"]
        # the run's frontier below: Q8_0 (closest, fastest) and int4 (smaller) both worth choosing;
        # the failed Q4_K_M is listed, never marked
        below = lines[next(i for i, x in enumerate(lines) if "'s exports (*" in x) + 2:]
        frontier = {cells[-6]: cells for cells in map(str.split, below) if len(cells) >= 6}
        assert frontier["Q8_0"] == ["*", "Q8_0", "14", "+0.55%", "0.0039", "97%", "41.3"]
        assert frontier["int4"][0] == "*" and frontier["Q4_K_M"][0] == "Q4_K_M"


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
        # ONNX shows int4's 8-bit layout choice (measured by default) instead of the imatrix's
        assert [dialog.query_one(f"#{w}").display for w in ("more", "imatrix", "calibrate")] == [
            False, False, True]
        assert dialog.query_one("#calibrate", Select).value == "auto"
        dialog.query_one("#calibrate", Select).value = "off"
        dialog.query_one("#go").press()
        await settle(app, pilot)
        assert _queued(fixed_ws, "export") == {"run": RUN, "format": "onnx", "types": ["int4"],
                                               "overrides": {}, "calibrate": "off"}
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


async def test_the_plan_format_queues_gguf_and_onnx_candidates_in_one_job(fixed_ws: Workspace) -> None:
    """As `appliance export plan`: both lists side by side, the plan's defaults ticked, both
    calibrations beside them, one job queued with every ticked type (the frontier under each
    export's parity table is test_list_verdicts_and_parity_table's)."""
    app = app_for(fixed_ws, poll_s=0.3)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("6", "e")
        await settle(app, pilot)
        dialog = app.screen
        dialog.query_one("#format", Select).value = "plan"
        await settle(app, pilot)
        gguf, onnx = (dialog.query_one(f"#{w}", SelectionList) for w in ("types", "onnx-types"))
        assert list(gguf.selected) == ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"]
        assert list(onnx.selected) == ["int8", "int4"] and onnx.display
        assert [dialog.query_one(f"#{w}").display for w in ("more", "imatrix", "calibrate")] == [
            False, True, True]
        assert dialog.query_one("#go").region.bottom <= 24  # the buttons stay on an 80x24 screen
        gguf.deselect("Q6_K")
        onnx.select("fp16")
        dialog.query_one("#calibrate", Select).value = "off"
        dialog.query_one("#go").press()
        await settle(app, pilot)
        assert _queued(fixed_ws, "export") == {
            "run": RUN, "format": "plan", "types": ["Q8_0", "Q5_K_M", "Q4_K_M", "int8", "int4", "fp16"],
            "overrides": {}, "imatrix": "auto", "calibrate": "off"}
        await pilot.press("e")  # back to one format: the ONNX list goes, GGUF's defaults return
        await settle(app, pilot)
        dialog = app.screen
        dialog.query_one("#format", Select).value = "plan"
        await settle(app, pilot)
        dialog.query_one("#format", Select).value = "gguf"
        await settle(app, pilot)
        assert not dialog.query_one("#onnx-types").display
        assert list(dialog.query_one("#types", SelectionList).selected) == ["Q8_0", "Q4_K_M"]


async def test_an_edge_install_greys_merge_export_and_verify(fixed_ws: Workspace) -> None:
    before = len(jobs.list_jobs(fixed_ws))
    app = app_for(fixed_ws, profile="edge")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("6")
        await settle(app, pilot)
        screen = app.screen
        assert [screen.check_action(a, ()) for a in ("merge", "export", "verify", "delete")] == [
            None, None, None, True]  # greyed in the footer; deleting stays
        await pilot.press("e", "m", "v")
        await settle(app, pilot)
        assert app.screen is screen  # no dialog opened
    assert len(jobs.list_jobs(fixed_ws)) == before


async def test_an_unknown_gguf_type_is_refused_naming_the_field_and_queues_nothing(
        fixed_ws: Workspace) -> None:
    """A typo in "more types" used to queue a job that failed minutes later, after merging."""
    from textual.widgets import Input

    app = app_for(fixed_ws, poll_s=0.3)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("6", "e")
        await settle(app, pilot)
        dialog = app.screen
        dialog.query_one("#more", Input).value = "Q3_X"
        dialog.query_one("#go").press()
        await wait_for(pilot, lambda: "unknown quantization" in screen_text(app), 30, "the refusal")
        await settle(app, pilot)
        # shown at the field, in the form that stays open (no error modal over a closed form)
        assert app.screen is dialog and dialog.query_one("#more", Input).has_class("-invalid")
        assert not dialog.query_one("#types").has_class("-invalid")
        problem = str(dialog.query_one(".problem", Static).render())
        assert problem.startswith("✗ types: unknown quantization type 'Q3_X'")
        assert not [j for j in jobs.list_jobs(fixed_ws) if j.kind == "export" and j.state == "queued"]
        dialog.query_one("#more", Input).value = "q6_k"  # fixed: the form closes, the job is queued
        dialog.query_one("#imatrix", Select).value = "off"  # beside it: the importance matrix
        dialog.query_one("#go").press()
        await settle(app, pilot)
        assert app.screen is not dialog
        queued = _queued(fixed_ws, "export")
        assert queued["types"] == ["Q8_0", "Q4_K_M", "q6_k"] and queued["imatrix"] == "off"


async def test_no_type_ticked_is_shown_at_the_types_field(fixed_ws: Workspace) -> None:
    app = app_for(fixed_ws, poll_s=0.3)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("6", "e")
        await settle(app, pilot)
        dialog = app.screen
        dialog.query_one("#types", SelectionList).deselect_all()
        dialog.query_one("#go").press()
        await settle(app, pilot)
        assert app.screen is dialog and dialog.query_one("#types").has_class("-invalid")
        assert "pick at least one type" in str(dialog.query_one(".problem", Static).render())
        assert not [j for j in jobs.list_jobs(fixed_ws) if j.state == "queued"]


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


# -- a running export's progress ---------------------------------------------------------------------
def _running_export(ws: Workspace) -> Stages:
    """A running export job of fixed id (no process: never judged interrupted), and the `Stages`
    that write its progress events exactly as `convert.export_gguf` would through the job."""
    with ws.connect() as db:
        db.execute("INSERT INTO jobs (id, kind, params, state, created, started, attempt) VALUES "
                   "(?, 'export', ?, 'running', '2026-11-22T12:00:00+00:00', "
                   "'2026-11-22T12:00:01+00:00', 1)",
                   (EXPORT_JOB, json.dumps({"run": RUN, "format": "gguf", "types": ["Q8_0", "Q4_K_M"],
                                            "overrides": {}})))
    folder = jobs.job_dir(ws, EXPORT_JOB)
    folder.mkdir(parents=True)
    for event in ({"type": "state", "state": "queued", "kind": "export"},
                  {"type": "state", "state": "running"}):
        jobs.append_event(folder, event)
    ctx = jobs.JobContext(ws, jobs.get(ws, EXPORT_JOB))
    stages = Stages(ctx.progress, artifacts_total=2)
    stages.reused(f"{RUN}-merged")
    stages.start(Q8)
    ctx.log("converting /srv/appliance/exports/support-run-merged to GGUF (f16)")
    stages.counter("convert", "converting to GGUF F16", "%")
    return stages


def _activity(app: object) -> str:
    return str(app.screen.query_one("#activity", Static).render())  # type: ignore[attr-defined]


def _scoring_q4(stages: Stages) -> None:
    """The first artifact done; the second quantized, checked, and 5 of 16 conversations scored."""
    stages.finished(Q8)
    stages.start(Q4)
    count = stages.counter("quantize", "quantizing to Q4_K_M", "tensors")
    for tensor in range(1, 273):
        count(tensor, 272)
    stages.emit("check", "checking support-run-Q4_K_M.gguf")
    count = stages.counter("score", "scoring q4_k_m", "conversations", 16)
    for conversation in range(1, 6):
        count(conversation, 16)


async def test_a_running_export_shows_its_stage_and_a_gauge(fixed_ws: Workspace) -> None:
    """The artifact and stage of a running export, a gauge once the stage's size is known, updated
    on the screen's poll; the lines go when the job ends."""
    stages = _running_export(fixed_ws)
    app = app_for(fixed_ws, poll_s=0.2)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("6")
        await settle(app, pilot)
        activity = app.screen.query_one("#activity", Static)
        assert activity.display
        head, stage = _activity(app).splitlines()
        assert head == f"export {EXPORT_JOB} · {Q8} (0/2 done)"
        assert stage.startswith("  converting to GGUF F16… 0m")  # size unknown: no gauge, the time
        count = stages.counter("quantize", "quantizing to Q8_0", "tensors")
        count(136, 272)
        await wait_for(pilot, lambda: "quantizing" in _activity(app), 10, "the next poll")
        assert _activity(app).splitlines()[1] == f"  {'█' * 10}{'░' * 10} quantizing to Q8_0 136/272 tensors"
        _scoring_q4(stages)
        await wait_for(pilot, lambda: "scoring" in _activity(app), 10, "the next poll")
        assert _activity(app).splitlines() == [f"export {EXPORT_JOB} · {Q4} (1/2 done)",
                                               f"  {'█' * 6}{'░' * 14} scoring q4_k_m 5/16 conversations"]
        assert "export" in screen_text(app).splitlines()[-3]  # above the footer, fits 80 columns
        jobs._transition(fixed_ws, EXPORT_JOB, ("running",), "succeeded", message="done")
        await wait_for(pilot, lambda: not activity.display, 10, "the activity lines to go")


async def test_snapshot_of_a_running_export(fixed_ws: Workspace, tmp_path: Path) -> None:
    """Exports at 80x24 while an export scores its second artifact."""
    _scoring_q4(_running_export(fixed_ws))
    app = app_for(fixed_ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("6")
        await settle(app, pilot)
        check_snapshot(app, "exports-progress-80x24", tmp_path)
