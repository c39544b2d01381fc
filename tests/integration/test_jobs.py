"""Jobs run detached in real processes: they outlive their starter (which reaps them, leaving no
zombie), survive kill -9 as 'interrupted', resume from their checkpoint, and cancel in every phase:
cooperatively where they check, interrupted (with their child processes) where they cannot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance import api, jobs
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
    with pytest.raises(ApplianceError, match="has already ended: cancelled"):
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
        api.run(workspace, job.id)
    with pytest.raises(ApplianceError, match="unknown job kind"):
        api.submit(workspace, "format-disk", {})


def test_resume_refuses_a_finished_job(workspace: Workspace) -> None:
    job = jobs.submit(workspace, "selftest", {"steps": 1, "interval": 0})
    assert api.run(workspace, job.id).state == "succeeded"
    with pytest.raises(ApplianceError, match="only a failed, cancelled or interrupted job"):
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
    assert api.run(workspace, job.id).state == "succeeded"
    events = jobs.read_events(workspace, job.id)
    assert any("unreadable event line" in e.get("message", "") for e in events)
    assert events[-1]["state"] == "succeeded"


# -- cancel in a phase that never checks, child processes, and why an action cannot apply ---------
def _children(pid: int) -> dict[int, str]:
    """The child processes of `pid` and their state letter (R, S, Z...), from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found[int(stat.parent.name)] = fields[0]
    return found


def _loading(ws: Workspace, job_id: str) -> bool:
    return any(e.get("stage") == "load" for e in jobs.read_events(ws, job_id))


@pytest.mark.parametrize("child", [False, True], ids=["in-process", "child-process"])
def test_cancel_stops_a_job_in_a_phase_that_never_checks(workspace: Workspace, stop_jobs_after,
                                                         child: bool) -> None:
    """A 'load' of ten minutes that never looks at the cancel flag (as a model load, or a wait
    on a converter child) is interrupted: the job ends cancelled, its child is gone, and no step
    (nor checkpoint) was written."""
    stop_jobs_after(workspace)
    job = jobs.start(workspace, "selftest", {"steps": 3, "interval": 0, "load": 600, "child": child})
    wait_for(lambda: _loading(workspace, job.id), what="the load phase")
    pid = jobs.get(workspace, job.id).pid
    if child:
        wait_for(lambda: _children(pid), what="the child process")
        (child_pid,) = _children(pid)
    jobs.cancel(workspace, job.id)
    cancelled = wait_state(workspace, job.id, "cancelled", timeout=120)
    assert cancelled.message == "cancelled by the operator"
    assert steps_done(workspace, job.id) == 0
    assert not (jobs.job_dir(workspace, job.id) / "checkpoint.json").exists()
    if child:
        assert not Path(f"/proc/{child_pid}").exists() or _children(pid).get(child_pid) in ("Z", None)
    assert jobs.resume(workspace, job.id, detach=False).state == "queued"  # and it can go on


def test_sigterm_stops_a_job_in_a_phase_that_never_checks(workspace: Workspace, stop_jobs_after) -> None:
    stop_jobs_after(workspace)
    job = jobs.start(workspace, "selftest", {"steps": 3, "interval": 0, "load": 600})
    wait_for(lambda: _loading(workspace, job.id), what="the load phase")
    os.kill(jobs.get(workspace, job.id).pid, signal.SIGTERM)  # what systemd sends
    assert wait_state(workspace, job.id, "cancelled", timeout=120).state == "cancelled"


def test_finished_jobs_started_here_are_reaped(workspace: Workspace) -> None:
    """A long-lived starter (the TUI) must not collect zombies: each job it started is reaped
    when it ends, without the starter waiting for it."""
    started = [jobs.start(workspace, "selftest", {"steps": 1, "interval": 0}) for _ in range(3)]
    pids = [jobs.get(workspace, j.id).pid for j in started]
    assert all(pids) and set(pids) <= set(_children(os.getpid()))  # spawn returned at once
    for job in started:
        wait_state(workspace, job.id, "succeeded")
    wait_for(lambda: not set(pids) & set(_children(os.getpid())), timeout=30,
             what="the finished jobs to be reaped (zombies left: "
                  f"{[p for p, s in _children(os.getpid()).items() if p in pids]})")


def test_resume_of_a_live_job_and_cancel_of_an_ended_one_say_why(workspace: Workspace,
                                                                  stop_jobs_after) -> None:
    from appliance.errors import BusyError, RefusedError

    stop_jobs_after(workspace)
    job = jobs.start(workspace, "selftest", {"steps": 200, "interval": 0.1})
    wait_state(workspace, job.id, "running")
    with pytest.raises(BusyError, match=f"job {job.id} is running") as running:
        jobs.resume(workspace, job.id)
    assert "jobs cancel" in str(running.value.hint)
    jobs.cancel(workspace, job.id)
    wait_state(workspace, job.id, "cancelled")
    with pytest.raises(RefusedError, match=f"job {job.id} has already ended: cancelled") as ended:
        jobs.cancel(workspace, job.id)
    assert f"jobs resume {job.id}" in str(ended.value.hint)

    done = jobs.submit(workspace, "selftest", {"steps": 1, "interval": 0})
    api.run(workspace, done.id)
    with pytest.raises(RefusedError, match="has already ended: succeeded") as finished:
        jobs.cancel(workspace, done.id)
    assert "resume" not in str(finished.value.hint)
    with pytest.raises(RefusedError, match=f"job {done.id} succeeded"):
        jobs.resume(workspace, done.id)


def test_a_job_row_written_before_the_registry_moved_still_resumes(workspace: Workspace) -> None:
    """A row as the version before `appliance.stages` wrote it (an interrupted selftest, its
    checkpoint at step 2, a params key this version does not know): resumed and run through the
    door, it finishes from its checkpoint under the same kind name."""
    job_id = "20261201-120000-selftest-0a1b2c"
    jobs._ensure(workspace)  # the table, as every version made it
    with workspace.connect() as db:
        db.execute("INSERT INTO jobs (id, kind, params, state, created, started, finished, pid,"
                   " pid_start, attempt, message, result) VALUES (?, 'selftest', ?, 'interrupted',"
                   " '2026-12-01T12:00:00+00:00', '2026-12-01T12:00:01+00:00', NULL, 999999, 'x', 1,"
                   " 'its process died', '{}')",
                   (job_id, json.dumps({"steps": 3, "interval": 0, "old_key": True})))
    directory = jobs.job_dir(workspace, job_id)
    directory.mkdir(parents=True)
    (directory / "checkpoint.json").write_text(json.dumps({"step": 2}))
    assert jobs.resume(workspace, job_id, detach=False).state == "queued"
    done = api.run(workspace, job_id)
    assert (done.state, done.attempt, done.result) == ("succeeded", 2, {"steps": 3})
