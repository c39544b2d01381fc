"""Data-parallel training (DDP through torchrun) on CPU with gloo: two worker processes at batch b
must take the same steps as one process at batch 2b, and the job model (events, run artifact,
cancel, failures) must hold across the worker processes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from appliance import api, jobs
from appliance.workspace import Workspace
from tests.integration.test_train import losses, params, wait

pytestmark = pytest.mark.integration
SAME = {"lora_dropout": 0.0, "batch_size": 2, "max_steps": 4, "eval_every": 2, "save_every": 2}


def test_two_workers_take_the_same_steps_as_one_process_at_the_same_global_batch(
        train_ws: Workspace) -> None:
    single = jobs.submit(train_ws, "train", params("single", **SAME, grad_accum=2))
    assert api.run(train_ws, single.id).state == "succeeded"
    ddp = jobs.submit(train_ws, "train", params("ddp", **SAME, grad_accum=1, devices=2))
    done = api.run(train_ws, ddp.id)
    assert done.state == "succeeded", done.message + (train_ws.root / "jobs" / ddp.id /
                                                      "workers.log").read_text()[-3000:]
    a, b = losses(train_ws, single.id), losses(train_ws, ddp.id)
    assert sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-3), (step, a, b)
    evals = {e["step"]: e["eval_loss"] for e in jobs.read_events(train_ws, ddp.id) if e["type"] == "eval"}
    single_evals = {e["step"]: e["eval_loss"] for e in jobs.read_events(train_ws, single.id)
                    if e["type"] == "eval"}
    assert evals == pytest.approx(single_evals, rel=2e-3)
    run = train_ws.get("run", "ddp")
    config = json.loads((run.path / "manifest.json").read_text())["config"]
    assert config["devices"] == 2
    # one set of events (rank 0), not one per worker
    steps = [e["step"] for e in jobs.read_events(train_ws, ddp.id) if e["type"] == "progress"
             and "loss" in e]  # training steps, not the stage events between them
    assert steps == [1, 2, 3, 4]


def test_cancel_stops_every_worker_after_a_checkpoint_and_resume_finishes(train_ws: Workspace) -> None:
    job = jobs.start(train_ws, "train", params("ddp-cancel", **{**SAME, "max_steps": 30}, devices=2))
    wait(train_ws, job.id, lambda j: max(losses(train_ws, j.id), default=0) >= 2)
    jobs.cancel(train_ws, job.id)
    assert wait(train_ws, job.id, lambda j: j.state in jobs.TERMINAL).state == "cancelled"
    work = Path(train_ws.root / "jobs" / job.id / "work")
    assert list(work.glob("checkpoints/step-*/COMPLETE"))
    assert json.loads((work / "outcome.0.json").read_text())["state"] == "cancelled"
    jobs.resume(train_ws, job.id)
    assert wait(train_ws, job.id, lambda j: j.state in jobs.TERMINAL).state == "succeeded"
    assert max(losses(train_ws, job.id)) == 30


def test_a_worker_failure_fails_the_job_with_its_reason(train_ws: Workspace) -> None:
    job = jobs.submit(train_ws, "train", params("ddp-bad", **SAME, devices=2, max_seq_len=16))
    done = api.run(train_ws, job.id)
    assert done.state == "failed"
    assert "Nothing to train on" in done.message and "max_seq_len=16" in done.message


def _workers(job_id: str) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        module = b"appliance.stages.train.distributed"
        if b"worker" in cmdline and job_id.encode() in cmdline and module not in cmdline:
            found.append(int(proc.name))
    return found


def test_kill_9_of_the_runner_takes_the_workers_down_and_resume_finishes(train_ws: Workspace) -> None:
    job = jobs.start(train_ws, "train", params("ddp-kill", **{**SAME, "max_steps": 30}, devices=2))
    wait(train_ws, job.id, lambda j: max(losses(train_ws, j.id), default=0) >= 3)
    assert len(_workers(job.id)) == 2
    os.kill(jobs.get(train_ws, job.id).pid, signal.SIGKILL)
    assert wait(train_ws, job.id, lambda j: j.state == "interrupted").state == "interrupted"
    deadline = time.monotonic() + 60
    while _workers(job.id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _workers(job.id), "workers outlived their runner"
    jobs.resume(train_ws, job.id)
    assert wait(train_ws, job.id, lambda j: j.state in jobs.TERMINAL).state == "succeeded"
    assert sorted(losses(train_ws, job.id)) == list(range(1, 31))
