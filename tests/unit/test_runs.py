"""A new run's name is refused when it is invalid, when the run exists, or when a train job that is
queued, running or interrupted will publish it; the CLI and the TUI differ only in the hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import jobs
from appliance.errors import ApplianceError, ValidationError
from appliance.stages.train import runs
from appliance.workspace import Workspace


def _workspace(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "home").ensure()


def _train_job(ws: Workspace, name: str, state: str, kind: str = "train") -> jobs.Job:
    job = jobs.submit(ws, kind, {"name": name})
    with ws.connect() as db:
        db.execute("UPDATE jobs SET state=? WHERE id=?", (state, job.id))
    return jobs.get(ws, job.id)


def test_a_free_valid_name_passes(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    _train_job(ws, "done-run", "succeeded")
    _train_job(ws, "given-up", "failed")
    _train_job(ws, "stopped", "cancelled")
    _train_job(ws, "not-a-train", "running", kind="selftest")
    for name in ("fresh", "done-run", "given-up", "stopped", "not-a-train"):
        runs.check_new_run(ws, name)
    runs.check_new_run(Workspace(tmp_path / "no-workspace-yet"), "fresh")


def test_an_invalid_name_is_a_validation_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="invalid run name 'a b'"):
        runs.check_new_run(_workspace(tmp_path), "a b")


def test_an_existing_run_is_refused_with_the_callers_hint(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    ws.artifact_dir("run", "taken").mkdir(parents=True)
    with pytest.raises(ApplianceError) as err:
        runs.check_new_run(ws, "taken", rename="pick another --name")
    assert (err.value.title, err.value.message, err.value.hint) == \
        ("Already exists", "run 'taken' already exists", "pick another --name")


@pytest.mark.parametrize("state", runs.TRAIN_BUSY_STATES)
def test_a_name_a_busy_train_job_will_publish_is_refused(tmp_path: Path, state: str) -> None:
    ws = _workspace(tmp_path)
    job = _train_job(ws, "held", state)
    with pytest.raises(ApplianceError) as err:
        runs.check_new_run(ws, "held", jobs_at=" (5 Jobs)")
    assert (err.value.title, err.value.message, err.value.hint) == \
        ("Name in use", f"job {job.id} ({state}) will publish run 'held'",
         "pick another name, or resume/cancel that job (5 Jobs)")


def test_busy_names_are_those_of_busy_train_jobs_only(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    for state in ("queued", "running", "interrupted", "succeeded", "failed"):
        _train_job(ws, f"run-{state}", state)
    _train_job(ws, "selftest-running", "running", kind="selftest")
    assert runs.busy_names(ws) == {"run-queued", "run-running", "run-interrupted"}
    assert runs.busy_names(Workspace(tmp_path / "empty")) == frozenset()


def test_the_train_form_checks_again_when_it_starts(tmp_path: Path) -> None:
    """The form validated against names read earlier; a job the CLI queued since is still caught."""
    from tui import trainform

    ws = _workspace(tmp_path)
    job = _train_job(ws, "raced", "queued")
    with pytest.raises(ApplianceError) as err:
        trainform.start(ws, trainform.FormState(), trainform.Checked(name="raced"))
    assert (err.value.title, err.value.message, err.value.hint) == \
        ("Name in use", f"job {job.id} (queued) will publish run 'raced'",
         "pick another name, or resume/cancel that job (5 Jobs)")
