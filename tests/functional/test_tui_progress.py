"""No frozen-looking waits: a running job's stage without counts shows how long it has been at it
(a model import's dequantization, an export's checks, a run's final eval and save), training's
head drops the old attempt's ETA after a resume and says what it does once the steps are done,
and rates below 10 tok/s keep a decimal. Events are written the way jobs write them; the clock is
the app's injected one, so nothing here depends on timing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from textual.widgets import Static
from tuikit import app_for, settle, wait_for

from appliance import jobs
from appliance.workspace import Workspace
from tui.feed import TrainProgress, summary_line
from tui.screens.base import activity_text, running_from
from tui.screens.train import live_head
from tui.widgets import KeyedTable, rate

T0 = 1795000000.0


def _events(*events: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"ts": T0 + i, **e} for i, e in enumerate(events)]


def _steps(n: int, total: int, eta: float = 45.0) -> list[dict[str, Any]]:
    return [{"type": "progress", "done": s, "total": total, "step": s, "loss": 2.0, "lr": 1e-4,
             "tokens_per_s": 3.4, "eta_s": eta} for s in range(1, n + 1)]


def test_an_uncounted_stage_shows_its_elapsed_time() -> None:
    events = _events({"type": "state", "state": "running"},
                     {"type": "progress", "done": 0, "total": 0, "stage": "check",
                      "label": "checking support-run-Q8_0.gguf", "unit": "", "artifact": "a",
                      "artifacts_done": 0, "artifacts_total": 1},
                     {"type": "log", "message": "llama.cpp loaded it"},
                     {"type": "progress", "done": 0, "total": 0, "stage": "check",
                      "label": "checking support-run-Q8_0.gguf", "unit": "", "artifact": "a",
                      "artifacts_done": 0, "artifacts_total": 1})
    now = T0 + 1 + 42.4  # 42 s after the stage began (not after its last event)
    assert summary_line(events, now=now).endswith("checking support-run-Q8_0.gguf… 0m42s")
    job = jobs.Job("j", "export", {}, "running", "", None, None, None, None, 1, "", {})
    text = activity_text([running_from(job, events, now)]).plain
    assert text.splitlines()[1] == "  checking support-run-Q8_0.gguf… 0m42s"


def test_a_job_that_only_logs_shows_how_long_since_its_last_line() -> None:
    events = _events({"type": "state", "state": "running"},
                     {"type": "log", "message": "dequantizing model.Q4_1.gguf to safetensors"})
    assert summary_line(events, now=T0 + 1 + 61) == \
        "dequantizing model.Q4_1.gguf to safetensors… 1m01s"
    assert summary_line(events) == "dequantizing model.Q4_1.gguf to safetensors"  # no clock: as was


def test_counted_progress_keeps_its_counts() -> None:
    events = _events(*_steps(3, 10))
    assert summary_line(events, now=T0 + 100).startswith("3/10 loss 2.0000")
    assert "m" not in summary_line(events, now=T0 + 100).split("loss")[1]


def test_training_done_but_still_running_shows_the_stage_not_eta_zero() -> None:
    p = TrainProgress("j", now=lambda: T0 + 100)
    p.add(_events({"type": "state", "state": "running"}, *_steps(10, 10, eta=0.0)))
    p.state = "running"
    head = live_head(p)
    assert "ETA" not in head and "step 10/10" in head
    assert "finishing" in head and "1m30s" in head  # since the last step (ts T0+10)
    p.add([{"ts": T0 + 20, "type": "progress", "done": 3, "total": 16, "stage": "eval",
            "label": "final evaluation", "unit": "batches"}])
    head = live_head(p)
    assert "step 10/10" in head and "final evaluation 3/16 batches" in head  # step kept
    p.add([{"ts": T0 + 40, "type": "progress", "done": 0, "total": 0, "stage": "save",
            "label": "saving the run"}])
    head = live_head(p)
    assert "saving the run… 1m00s" in head and "ETA" not in head


def test_a_resume_drops_the_old_eta_and_total_steps_show_before_the_first_step() -> None:
    p = TrainProgress("j", now=lambda: T0 + 100)
    p.add(_events({"type": "state", "state": "running"}, *_steps(4, 100, eta=432.0)))
    p.state = "running"
    assert "ETA 7m12s" in live_head(p)
    p.add([{"ts": T0 + 50, "type": "state", "state": "interrupted"},
           {"ts": T0 + 60, "type": "state", "state": "queued", "message": "resumed"},
           {"ts": T0 + 61, "type": "state", "state": "running"},
           {"ts": T0 + 62, "type": "log", "message": "loading smollm2 (nf4)"}])
    head = live_head(p)
    assert "7m12s" not in head and "step 4/100" in head
    fresh = TrainProgress("k", now=lambda: T0 + 100)
    fresh.add(_events({"type": "state", "state": "running"},
                      {"type": "progress", "done": 0, "total": 0, "stage": "load",
                       "label": "loading the model", "total_steps": 250}))
    fresh.state = "running"
    assert "step 0/250" in live_head(fresh) and "loading the model…" in live_head(fresh)


def test_rates_keep_a_decimal_below_ten() -> None:
    assert [rate(x) for x in (0.04, 3.44, 9.96, 10.4, 1534.5)] == ["0.0", "3.4", "10", "10", "1534"]


# -- on screen -------------------------------------------------------------------------------------
def _running_job(ws: Workspace, job_id: str, kind: str, events: list[dict[str, Any]]) -> None:
    ws.ensure()
    with ws.connect() as db:
        db.executescript(jobs.JOBS_SQL)
        db.execute("INSERT INTO jobs (id, kind, params, state, created, attempt) VALUES (?, ?, '{}', "
                   "'running', '2026-11-22T10:00:00+00:00', 1)", (job_id, kind))
    folder = jobs.job_dir(ws, job_id)
    folder.mkdir(parents=True)
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


async def test_screens_show_elapsed_time_of_a_silent_stage(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    job_id = "20261122-100000-import-model-abcdef"
    _running_job(ws, job_id, "import-model", _events(
        {"type": "state", "state": "running"},
        {"type": "log", "message": "dequantizing model.Q4_1.gguf to safetensors"}))
    clock = [T0 + 1 + 42]
    app = app_for(ws, clock=lambda: clock[0], poll_s=0.1)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        table = app.screen.query_one("#running", KeyedTable)
        assert "dequantizing" in str(table.get_row(job_id)[2])
        assert str(table.get_row(job_id)[2]).endswith("0m42s")
        clock[0] += 60
        await wait_for(pilot, lambda: str(table.get_row(job_id)[2]).endswith("1m42s"), 10,
                       "the next poll")
        await pilot.press("2")
        await settle(app, pilot)
        activity = str(app.screen.query_one("#activity", Static).render())
        assert "dequantizing" in activity and "m42s" in activity
        await pilot.press("5")
        await settle(app, pilot)
        assert "m42s" in str(app.screen.query_one("#job", Static).render())
