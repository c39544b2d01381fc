"""Whether a new training run may take a name: one check, shared by the CLI and the TUI.

A run's name is taken twice before anyone can reuse it: by the published run artifact, and earlier by
every training job that will publish it, which is any train job queued, running or interrupted
(resuming an interrupted job publishes under the name it was started with). Both front ends refuse
such a name before queueing a job, with the same titles and messages; only the hint differs, since
the CLI's user renames with `--name` and the TUI's in a field.
"""

from __future__ import annotations

from appliance import jobs
from appliance.errors import AlreadyExistsError, ApplianceError
from appliance.workspace import Workspace, check_name

TRAIN_BUSY_STATES = ("queued", "running", "interrupted")  # train jobs that will still publish a run


def busy_train_jobs(ws: Workspace) -> list[jobs.Job]:
    """The train jobs that will still publish their run, newest first."""
    return [j for j in jobs.list_jobs(ws) if j.kind == "train" and j.state in TRAIN_BUSY_STATES]


def busy_names(ws: Workspace) -> frozenset[str]:
    """The run names that busy train jobs will publish (what live validation checks against)."""
    return frozenset(j.params.get("name", "") for j in busy_train_jobs(ws))


def check_new_run(ws: Workspace, name: str, *, rename: str = "pick another name",
                  jobs_at: str = "") -> None:
    """Raise unless `name` is a valid run name that no run has and no busy train job will publish.

    `rename` is the hint's way to pick another name ("pick another --name"), `jobs_at` where the
    user manages jobs (" (5 Jobs)"), appended to the hint of a name a job holds."""
    check_name(name, "run name")
    if ws.artifact_dir("run", name).exists():
        raise AlreadyExistsError(f"run {name!r} already exists", hint=rename)
    for job in busy_train_jobs(ws):
        if job.params.get("name") == name:
            raise ApplianceError(f"job {job.id} ({job.state}) will publish run {name!r}",
                                 title="Name in use",
                                 hint=f"{rename}, or resume/cancel that job{jobs_at}")
