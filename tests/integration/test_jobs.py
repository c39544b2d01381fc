"""Jobs run detached in real processes: they outlive their starter, survive kill -9 as
'interrupted', resume from their checkpoint, and cancel cooperatively."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance import jobs
from appliance.errors import ApplianceError
from appliance.workspace import Workspace

ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def steps_done(ws: Workspace, job_id: str) -> int:
    events = [e for e in jobs.read_events(ws, job_id) if e["type"] == "progress"]
    return int(events[-1]["done"]) if events else 0


def wait_state(ws: Workspace, job_id: str, state: str, timeout: float = 60) -> jobs.Job:
    wait_for(lambda: jobs.get(ws, job_id).state == state, timeout, f"state {state}")
    return jobs.get(ws, job_id)


def test_job_outlives_the_command_that_started_it(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "appliance", "--home", str(ws.root), "jobs",
                          "selftest", "--steps", "6", "--interval", "0.2"],
                         capture_output=True, text=True, env=env, timeout=60, check=True)
    job_id = out.stdout.split()[2]
    assert jobs.get(ws, job_id).state in ("queued", "running")  # the CLI has exited already
    job = wait_state(ws, job_id, "succeeded")
    assert job.result == {"steps": 6} and job.attempt == 1
    states = [e["state"] for e in jobs.read_events(ws, job_id) if e["type"] == "state"]
    assert states == ["queued", "running", "succeeded"]
    assert [e["done"] for e in jobs.read_events(ws, job_id) if e["type"] == "progress"] == [1, 2, 3, 4, 5, 6]


def test_kill_9_marks_interrupted_and_resume_continues_from_the_checkpoint(workspace: Workspace) -> None:
    job = jobs.start(workspace, "selftest", {"steps": 8, "interval": 0.2})
    wait_for(lambda: steps_done(workspace, job.id) >= 3, what="three steps")
    pid = jobs.get(workspace, job.id).pid
    assert pid
    os.kill(pid, signal.SIGKILL)
    interrupted = wait_state(workspace, job.id, "interrupted")
    assert "resume" in interrupted.message
    reached = steps_done(workspace, job.id)

    jobs.resume(workspace, job.id)
    done = wait_state(workspace, job.id, "succeeded")
    assert done.attempt == 2 and done.result == {"steps": 8}
    logs = [e["message"] for e in jobs.read_events(workspace, job.id) if e["type"] == "log"]
    assert logs[-1] == f"attempt 2: starting at step {reached} of 8"  # not from zero
    progress = [e["done"] for e in jobs.read_events(workspace, job.id) if e["type"] == "progress"]
    assert progress == list(range(1, 9))  # every step exactly once across both attempts


def test_cancel_stops_a_running_job_and_keeps_its_checkpoint(workspace: Workspace) -> None:
    job = jobs.start(workspace, "selftest", {"steps": 50, "interval": 0.1})
    wait_for(lambda: steps_done(workspace, job.id) >= 2, what="two steps")
    jobs.cancel(workspace, job.id)
    cancelled = wait_state(workspace, job.id, "cancelled")
    assert cancelled.message == "cancelled by the operator"
    assert 2 <= json.loads((jobs.job_dir(workspace, job.id) / "checkpoint.json").read_text())["step"] < 50
    with pytest.raises(ApplianceError, match="only queued or running"):
        jobs.cancel(workspace, job.id)


def test_sigterm_is_a_cancel(workspace: Workspace) -> None:
    job = jobs.start(workspace, "selftest", {"steps": 50, "interval": 0.1})
    wait_for(lambda: steps_done(workspace, job.id) >= 1, what="one step")
    os.kill(jobs.get(workspace, job.id).pid, signal.SIGTERM)
    assert wait_state(workspace, job.id, "cancelled").state == "cancelled"


def test_queued_job_cancels_at_once_and_runs_only_once(workspace: Workspace) -> None:
    job = jobs.submit(workspace, "selftest", {"steps": 1, "interval": 0})
    assert jobs.cancel(workspace, job.id).state == "cancelled"
    with pytest.raises(ApplianceError, match="not queued"):
        jobs.run(workspace, job.id)
    with pytest.raises(ApplianceError, match="unknown job kind"):
        jobs.submit(workspace, "format-disk", {})


def test_resume_refuses_a_finished_job(workspace: Workspace) -> None:
    job = jobs.submit(workspace, "selftest", {"steps": 1, "interval": 0})
    assert jobs.run(workspace, job.id).state == "succeeded"
    with pytest.raises(ApplianceError, match="only failed"):
        jobs.resume(workspace, job.id)


@pytest.mark.integration
def test_model_import_as_a_detached_job(workspace: Workspace, tiny_llama: Path) -> None:
    ok = jobs.start(workspace, "import-model", {"path": str(tiny_llama), "name": "tiny"})
    assert wait_state(workspace, ok.id, "succeeded", timeout=300).result["model"] == "tiny"
    assert workspace.get("model", "tiny").summary["architecture"] == "LlamaForCausalLM"

    (tiny_llama / "model.safetensors").unlink()
    (tiny_llama / "pytorch_model.bin").write_bytes(b"x")
    bad = jobs.start(workspace, "import-model", {"path": str(tiny_llama), "name": "bad"})
    failed = wait_state(workspace, bad.id, "failed", timeout=300)
    assert failed.message.startswith("Refused:") and "pickle" in failed.message


def test_a_runner_that_dies_before_claiming_its_job_fails_it(workspace: Workspace) -> None:
    job = jobs.submit(workspace, "selftest", {"steps": 1, "interval": 0})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    jobs._update_if_queued(workspace, job.id, dead.pid)  # as spawn records its runner
    failed = jobs.get(workspace, job.id)  # get() refreshes
    assert failed.state == "failed" and "exited before starting" in failed.message
    assert jobs.resume(workspace, job.id, detach=False).state == "queued"


def test_a_torn_event_line_does_not_hide_later_events(workspace: Workspace) -> None:
    job = jobs.submit(workspace, "selftest", {"steps": 1, "interval": 0})
    with open(jobs.job_dir(workspace, job.id) / "events.jsonl", "a") as fh:
        fh.write('{"type": "log", "mess\n')
    assert jobs.run(workspace, job.id).state == "succeeded"
    events = jobs.read_events(workspace, job.id)
    assert any("unreadable event line" in e.get("message", "") for e in events)
    assert events[-1]["state"] == "succeeded"
