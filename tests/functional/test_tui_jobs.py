"""Jobs: the UI attaches to jobs started from the CLI, tails their log, cancels and resumes them,
and stays responsive while a job floods its events file."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from textual.widgets import ContentSwitcher, RichLog
from tuikit import app_for, settle, wait_for

from appliance import jobs
from appliance.workspace import Workspace
from tui.feed import EventTail, TrainProgress, collapse
from tui.widgets import KeyedTable, LineChart


def _cli(ws: Workspace, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "appliance", "--home", str(ws.root), *args],
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout


def _state(ws: Workspace, job_id: str) -> str:
    return jobs.get(ws, job_id).state


async def test_attaches_to_a_cli_job_tails_it_cancels_and_resumes(workspace: Workspace) -> None:
    _cli(workspace, "jobs", "selftest", "--steps", "400", "--interval", "0.05")
    job = jobs.list_jobs(workspace)[0]
    app = app_for(workspace, poll_s=0.2)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("5")
            await settle(app, pilot)
            table = app.screen.query_one("#jobs", KeyedTable)
            await wait_for(pilot, lambda: table.selected_key() == job.id, 10, "the CLI's job")
            log = app.screen.query_one("#log", RichLog)
            await wait_for(pilot, lambda: any(line.text.startswith("step ") for line in log.lines), 20,
                           "progress lines in the log")
            await pilot.press("c")
            await wait_for(pilot, lambda: type(app.screen).__name__ == "ConfirmDialog", 10,
                           "the confirmation")
            await pilot.press("y")
            await wait_for(pilot, lambda: _state(workspace, job.id) == "cancelled", 20, "cancelled")
            await wait_for(pilot, lambda: "cancelled" in str(table.get_row(job.id)), 10, "the row")
            await pilot.press("u")
            await wait_for(pilot, lambda: _state(workspace, job.id) == "running", 20, "resumed")
            await wait_for(pilot, lambda: any("attempt 2" in line.text for line in log.lines), 20,
                           "the second attempt's log")
    finally:
        if _state(workspace, job.id) in ("queued", "running"):
            jobs.cancel(workspace, job.id)


def _fake_running_train(ws: Workspace, job_id: str) -> Path:
    """A train job row without a process (pid NULL: never judged dead) and its events file."""
    ws.ensure()
    with ws.connect() as db:
        db.executescript(jobs.JOBS_SQL)
        db.execute("INSERT INTO jobs (id, kind, params, state, created) VALUES (?, 'train', '{}', "
                   "'running', '2026-11-22T10:00:00+00:00')", (job_id,))
    folder = jobs.job_dir(ws, job_id)
    folder.mkdir(parents=True)
    return folder / "events.jsonl"


def _flood(path: Path, steps: int, seconds: float) -> None:
    per_burst = steps // 20
    for burst in range(20):
        with open(path, "a", encoding="utf-8") as fh:
            for i in range(per_burst):
                step = burst * per_burst + i + 1
                fh.write(json.dumps({"ts": 0, "type": "progress", "done": step, "total": steps,
                                     "step": step, "loss": 3.0 - step / steps, "lr": 1e-4,
                                     "tokens_per_s": 1000.0, "eta_s": 1.0}) + "\n")
        time.sleep(seconds / 20)


async def test_ui_stays_responsive_while_a_job_floods_events(workspace: Workspace,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    steps, job_id = 6000, "20261122-100000-train-f10f10"
    events = _fake_running_train(workspace, job_id)
    draws = []
    real = LineChart.set_series
    monkeypatch.setattr(LineChart, "set_series", lambda self, *a: (draws.append(1), real(self, *a)))
    app = app_for(workspace, poll_s=0.25)
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_training(job_id)
        await settle(app, pilot)
        writer = threading.Thread(target=_flood, args=(events, steps, 3.0))
        started = time.monotonic()
        writer.start()
        views = app.screen.query_one("#views", ContentSwitcher)
        shown, presses = [views.current], 0
        while writer.is_alive():  # key presses are handled while the flood is folded in
            await pilot.press("ctrl+l")
            presses += 1
            shown.append(views.current)
        writer.join()
        screen = app.screen
        await wait_for(pilot, lambda: screen.progress is not None and screen.progress.step == steps,
                       20, "every event folded in")
        elapsed = time.monotonic() - started
    # state, not wall-clock (a loaded box is slow, not wrong): each press during the flood switched
    # the view, and the flood did not hold the keys back until its end
    assert presses >= 3, f"{presses} key presses handled during a {elapsed:.1f} s flood"
    assert all(a != b for a, b in itertools.pairwise(shown)), shown
    assert len(screen.progress.loss) == steps
    polls = elapsed / 0.25 + 4
    assert len(draws) <= 2 * polls, f"{len(draws)} chart updates for {polls:.0f} polls"


def test_progress_events_collapse_and_tail_reads_only_new_lines(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    path = _fake_running_train(ws, "j1")
    path.write_text("".join(json.dumps({"type": "progress", "done": i, "total": 9, "step": i,
                                        "loss": 1.0}) + "\n" for i in range(1, 10))
                    + json.dumps({"type": "log", "message": "hello"}) + "\n"
                    + '{"type": "progress", "do')  # a line being written
    tail = EventTail(ws, "j1")
    batch = tail.read()
    assert len(batch) == 10
    shown = collapse(batch)
    assert [e["type"] for e in shown] == ["progress", "log"]
    assert shown[0]["done"] == 9 and shown[0]["collapsed"] == 8
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('ne": 10, "total": 10, "step": 10, "loss": 0.5}\n')
    rest = tail.read()
    assert [e.get("done") for e in rest] == [10]
    progress = TrainProgress("j1")
    progress.add(batch + rest)
    assert progress.step == 10 and progress.loss[-1] == (10.0, 0.5)


async def test_cancel_asks_first_and_resume_is_not_offered_on_a_running_job(
        workspace: Workspace) -> None:
    job_id = "20261122-100000-train-c0c0c0"
    _fake_running_train(workspace, job_id)
    cancel_flag = jobs.job_dir(workspace, job_id) / "cancel"
    app = app_for(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_job(job_id)
        await settle(app, pilot)
        screen = app.screen
        assert screen.query_one("#jobs", KeyedTable).selected_key() == job_id
        assert not screen.check_action("resume", ())  # greyed out: it is running
        assert screen.check_action("cancel", ())
        await pilot.press("u")
        await settle(app, pilot)
        assert app.screen is screen and _state(workspace, job_id) == "running"
        await pilot.press("c")
        await settle(app, pilot)
        assert type(app.screen).__name__ == "ConfirmDialog"
        await pilot.press("n")  # kept
        await settle(app, pilot)
        assert app.screen is screen and not cancel_flag.exists()
        await pilot.press("c")
        await settle(app, pilot)
        await pilot.press("y")
        await settle(app, pilot)
        assert cancel_flag.exists()
        app.open_training(job_id)  # the training view's cancel asks too
        await settle(app, pilot)
        cancel_flag.unlink()
        await pilot.press("c")
        await settle(app, pilot)
        assert type(app.screen).__name__ == "ConfirmDialog"
        await pilot.press("escape")
        await settle(app, pilot)
        assert app.current_mode == "train" and not cancel_flag.exists()
        assert not app.screen.check_action("resume", ())


async def test_a_long_log_line_wraps_without_a_sideways_scrollbar(workspace: Workspace) -> None:
    """At 80 columns the log is 76 wide; RichLog's default min_width (78) rendered every wrapped
    line 78 wide: a horizontal scrollbar whose thumb showed as a stray glyph in the log's box."""
    job_id = "20261122-100000-train-10a10a"
    events = _fake_running_train(workspace, job_id)
    events.write_text(json.dumps({"type": "log", "message": "a long line " * 20}) + "\n")
    app = app_for(workspace)
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_job(job_id)
        await settle(app, pilot)
        log = app.screen.query_one("#log", RichLog)
        await wait_for(pilot, lambda: len(log.lines) > 1, 10, "the wrapped line")
        assert log.max_scroll_x == 0
