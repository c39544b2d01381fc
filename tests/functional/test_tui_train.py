"""Train: validation as you type, the planner's verdict, and a real CPU training job started from
the UI that outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from textual.widgets import Button, Checkbox, Input, Select, Static
from tuikit import RUN, app_for, build_fixed_workspace, no_gpu_probe, settle, wait_for

from appliance import jobs
from appliance.workspace import ArtifactRecord, Workspace


def _problems(app) -> str:
    return str(app.screen.query_one("#problems", Static).render())


async def _type(app, pilot, widget_id: str, text: str) -> None:
    field = app.screen.query_one(widget_id, Input)
    field.focus()
    field.value = ""
    await pilot.press(*text)
    await pilot.pause()


async def test_form_validates_as_you_type_and_shows_the_plan(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "spawn", lambda ws, job_id: 0)
    ws = build_fixed_workspace(tmp_path)
    app = app_for(ws)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("4")
        await settle(app, pilot)
        assert "ready: run smollm2-135m-instruct-support-chats" in _problems(app)
        assert "fits" in str(app.screen.query_one("#plan", Static).render())  # the H100 probe
        await _type(app, pilot, "#f-max_steps", "abc")
        await _type(app, pilot, "#f-lora_r", "0")
        await _type(app, pilot, "#f-max_seq_len", "9000")
        await _type(app, pilot, "#extras", "eval_batches=2; colour=3")
        problems = _problems(app)
        for expected in ("max_steps: must be an integer, got 'abc'", "lora_r: 0 is out of range",
                         "max_seq_len: 9000 is longer than the model's context (8192)",
                         "colour: unknown key"):
            assert expected in problems, expected
        assert app.screen.query_one("#f-max_steps").has_class("-invalid")
        assert app.screen.query_one("#start", Button).disabled
        await pilot.press("ctrl+s")  # refused, with every problem listed
        await settle(app, pilot)
        assert type(app.screen).__name__ == "ErrorDialog"
        await pilot.press("escape")
        await _type(app, pilot, "#f-max_steps", "20")
        await _type(app, pilot, "#f-lora_r", "8")
        await _type(app, pilot, "#f-max_seq_len", "8192")
        await _type(app, pilot, "#f-batch_size", "64")
        await _type(app, pilot, "#extras", "eval_batches=2")
        await _type(app, pilot, "#name", RUN)
        assert f"run '{RUN}' already exists" in _problems(app)
        await _type(app, pilot, "#name", "ui-run")
        app.screen.query_one("#target", Select).value = "t4-16gb"
        await pilot.pause()
        plan = str(app.screen.query_one("#plan", Static).render())
        assert "NVIDIA T4 16GB" in plan and "does NOT fit; largest that does: batch_size=" in plan
        assert "plan: the plan says it does not fit" in _problems(app)
        app.screen.query_one("#force", Checkbox).value = True
        await pilot.pause()
        assert "ready: run ui-run" in _problems(app)
        await pilot.press("ctrl+s")
        await settle(app, pilot)
        assert app.screen.query_one("#views").current == "live"
    [job] = [j for j in jobs.list_jobs(ws) if j.kind == "train" and j.state == "queued"]
    assert job.params["name"] == "ui-run" and job.params["dataset"] == "support-chats"
    assert job.params["config"]["batch_size"] == 64 and job.params["config"]["eval_batches"] == 2


async def test_a_bad_value_is_marked_at_its_field_and_queues_no_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The request's problems, by field: a recipe key with a field of its own is marked there, one
    typed in "more" is marked at "more"; starting is refused and nothing is queued."""
    monkeypatch.setattr(jobs, "spawn", lambda ws, job_id: 0)
    ws = build_fixed_workspace(tmp_path)
    app = app_for(ws)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("4")
        await settle(app, pilot)
        await _type(app, pilot, "#f-learning_rate", "5")
        await _type(app, pilot, "#extras", "optimizer=sgd")
        marked = {w.id for w in app.screen.query(".-invalid")}
        assert marked == {"f-learning_rate", "extras"}, marked
        problems = _problems(app)
        assert "learning_rate: 5 is out of range [1e-07, 1]" in problems
        assert "extras: optimizer: must be one of auto, adamw, paged_adamw_8bit" in problems
        await pilot.press("ctrl+s")
        await settle(app, pilot)
    assert not [j for j in jobs.list_jobs(ws) if j.kind == "train" and j.state == "queued"]


async def test_no_gpu_here_says_so_instead_of_planning(tmp_path: Path) -> None:
    ws = build_fixed_workspace(tmp_path)
    app = app_for(ws, probe=no_gpu_probe)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("4")
        await settle(app, pilot)
        assert "no GPU here: training runs on the CPU" in str(app.screen.query_one("#plan").render())
        assert "ready" in _problems(app)


def _still_running(ws: Workspace, job_id: str) -> bool:
    job = jobs.get(ws, job_id)
    return job.state == "running" and jobs.is_alive(job.pid, job.pid_start)


@pytest.mark.slow
async def test_train_from_the_ui_see_events_quit_and_find_it_running_from_the_cli(
        model_workspace: tuple[Workspace, ArtifactRecord]) -> None:
    from appliance.demo import sample_dataset
    from appliance.stages.datasets import importer as datasets

    ws, model = model_workspace
    datasets.import_file(ws, sample_dataset(), model, name="dolly")
    app = app_for(ws, poll_s=0.5, probe=no_gpu_probe)
    job_id = None
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("4")
            await settle(app, pilot)
            for key, value in (("max_steps", "400"), ("batch_size", "1"), ("grad_accum", "1"),
                               ("max_seq_len", "128"), ("eval_every", "1000"), ("save_every", "1000")):
                app.screen.query_one(f"#f-{key}", Input).value = value
            app.screen.query_one("#extras", Input).value = "eval_batches=1"
            app.screen.query_one("#name", Input).value = "ui-run"
            await pilot.pause()
            assert "ready: run ui-run" in _problems(app)
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: app.screen.tail is not None, 20, "the job to start")
            job_id = app.screen.tail.job_id
            await wait_for(pilot, lambda: len(app.screen.progress.loss) >= 2, 300, "two steps")
            head = str(app.screen.query_one("#live-head", Static).render())
            assert f"{job_id} running · step" in head and "tok/s" in head and "ETA" in head
            await pilot.press("q")  # quit the UI: the job goes on
        assert _still_running(ws, job_id)
        listed = subprocess.run([sys.executable, "-m", "appliance", "--home", str(ws.root), "jobs",
                                 "list"], capture_output=True, text=True, timeout=60, check=True)
        row = next(line for line in listed.stdout.splitlines() if line.startswith(job_id))
        assert "running" in row.split()
    finally:
        if job_id is not None:
            _stop(ws, job_id)


def _stop(ws: Workspace, job_id: str) -> None:
    """Cancel the test's job and wait for it; kill it by its pid only if it does not stop."""
    if jobs.get(ws, job_id).state in ("queued", "running"):
        jobs.cancel(ws, job_id)
    deadline = time.monotonic() + 120
    while jobs.get(ws, job_id).state in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.5)
    job = jobs.get(ws, job_id)
    if job.state == "running" and job.pid and jobs.is_alive(job.pid, job.pid_start):
        os.kill(job.pid, signal.SIGKILL)
    assert job.state == "cancelled", job


def test_no_model_means_no_made_up_run_name() -> None:
    from tui import trainform

    checked = trainform.check(trainform.FormState(), trainform.TrainChoices(
        recipes={"smollm2-cpu": ({}, "smollm2-cpu")}))
    assert "None" not in checked.name and "model" in checked.problems


async def test_the_run_name_placeholder_without_models(tmp_path: Path) -> None:
    app = app_for(Workspace(tmp_path / "none"), probe=no_gpu_probe)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("4")
        await settle(app, pilot)
        placeholder = app.screen.query_one("#name", Input).placeholder
        assert "None" not in placeholder and placeholder
        assert "None" not in _problems(app)


async def test_an_edge_install_shows_the_form_but_cannot_start_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    monkeypatch.setattr(jobs, "spawn", lambda ws, job_id: started.append(job_id) or 0)
    ws = build_fixed_workspace(tmp_path)
    before = len(jobs.list_jobs(ws))
    app = app_for(ws, profile="edge")
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("4")
        await settle(app, pilot)
        assert "training needs the full profile (this install is the edge profile)" in _problems(app)
        assert "ready: run" not in _problems(app)
        assert app.screen.query_one("#start", Button).disabled
        assert app.screen.check_action("start", ()) is None  # greyed in the footer
        await pilot.press("ctrl+s")
        await settle(app, pilot)
    assert started == [] and len(jobs.list_jobs(ws)) == before
