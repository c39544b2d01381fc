"""A cancel against what job code really does, run in this process by `jobs.run`: library code
that catches every Exception, cleanup that hides an error, an import whose commit the cancel
reaches too late, and an import resumed after its model was committed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from appliance import api, cancellation, jobs, manifest, stages
from appliance.jobs import JobContext
from appliance.workspace import Workspace


def _logs(ws: Workspace, job_id: str) -> list[str]:
    return [e["message"] for e in jobs.read_events(ws, job_id) if e["type"] == "log"]


def _run_kind(ws: Workspace, monkeypatch: pytest.MonkeyPatch, func: jobs.JobFunction) -> jobs.Job:
    monkeypatch.setitem(stages.KINDS, "under-test", func)
    return api.run(ws, jobs.submit(ws, "under-test", {}).id)


def test_a_cancel_goes_through_except_exception_and_removes_the_staging_dir(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    def swallowing(ctx: JobContext) -> dict[str, Any]:
        with ctx.ws.writer("model", "partial") as w:
            (w.path / "weights.bin").write_bytes(b"half")
            (ctx.dir / "cancel").touch()  # `appliance jobs cancel`, now
            for _ in range(200):  # as gguf_metadata's field walk: `except Exception: continue`
                try:
                    time.sleep(0.1)
                except Exception:  # the point of the test
                    continue
            w.commit()
        return {"model": "partial"}

    job = _run_kind(workspace, monkeypatch, swallowing)
    assert (job.state, job.message) == ("cancelled", "cancelled by the operator")
    assert list(workspace.kind_dir("model").iterdir()) == []  # no staging directory, no model
    assert not (jobs.job_dir(workspace, job.id) / "cancel").exists()


def test_an_error_hidden_by_the_cancel_is_logged(workspace: Workspace,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_then_cancelled(ctx: JobContext) -> None:
        try:
            raise OSError("the disk went away")
        except OSError:
            (ctx.dir / "cancel").touch()
            time.sleep(60)  # cleaning up after the error when the cancel lands

    job = _run_kind(workspace, monkeypatch, failing_then_cancelled)
    assert job.state == "cancelled"
    assert any("the disk went away" in m for m in _logs(workspace, job.id))


def test_a_cancel_at_the_final_commit_of_an_import_is_too_late(
        workspace: Workspace, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cancel arrives while the model is being committed: the watcher can only act after the
    commit, in what is left of the job (simulated as slow). The job must end succeeded, with its
    model, not cancelled with the model in place."""
    job = jobs.submit(workspace, "import-model", {"path": str(tiny_llama), "name": "tiny"})
    flag = jobs.job_dir(workspace, job.id) / "cancel"
    real_write, real_get = manifest.write, Workspace.get

    def write_then_cancel(root: Path, data: dict[str, Any]) -> Path:
        flag.touch()
        return real_write(root, data)

    def slow_get(self: Workspace, kind: str, name: str) -> Any:
        if flag.exists():
            time.sleep(cancellation.POLL_S * 10)
        return real_get(self, kind, name)

    monkeypatch.setattr(manifest, "write", write_then_cancel)
    monkeypatch.setattr(Workspace, "get", slow_get)
    done = api.run(workspace, job.id)
    assert (done.state, done.result.get("model")) == ("succeeded", "tiny")
    model = real_get(workspace, "model", "tiny")
    assert json.loads((model.path / manifest.MANIFEST).read_text())["config"]["job"] == job.id


def test_resuming_an_import_whose_model_was_committed_is_done(workspace: Workspace,
                                                              tiny_llama: Path) -> None:
    """Killed between committing its model and being marked done, an import resumes as done;
    a model of that name made by another job still stops a new import."""
    job = jobs.submit(workspace, "import-model", {"path": str(tiny_llama), "name": "tiny"})
    assert api.run(workspace, job.id).state == "succeeded"
    jobs._set_state(workspace, job.id, "interrupted", message="killed")  # as after kill -9
    jobs.resume(workspace, job.id, detach=False)
    again = api.run(workspace, job.id)
    assert (again.state, again.attempt, again.result["model"]) == ("succeeded", 2, "tiny")
    assert any("already imported" in m for m in _logs(workspace, job.id))

    other = jobs.submit(workspace, "import-model", {"path": str(tiny_llama), "name": "tiny"})
    failed = api.run(workspace, other.id)
    assert failed.state == "failed" and "already exists" in failed.message


def test_sigterm_with_no_place_for_the_flag_does_not_raise(tmp_path: Path) -> None:
    """SIGTERM's handler runs inside whatever the job was doing: a flag it cannot write (its
    directory removed, a full disk) must not turn into an error there."""
    handler = jobs._cancel_on_sigterm(tmp_path / "gone" / "cancel")
    handler(15, None)
    assert not (tmp_path / "gone").exists()
