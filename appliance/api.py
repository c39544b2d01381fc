"""The front ends' one door to the pipeline: the CLI, the TUI and the demo start jobs here.

It joins the job runner (`appliance.jobs`, which knows no stage) to the registry of stages
(`appliance.stages.KINDS`), so a job of a kind this version cannot run is refused before it is
queued, and a front end never needs to know where a stage lives.

A front end builds a stage's typed request (`appliance.stages.REQUESTS`: `ExportRequest`,
`TrainRequest`, ...) and hands it to `start_request`; `check` / `start` take a kind and its params
(what a job row stores). Either way a request whose fields are wrong is refused with
`InvalidRequest`, whose `problems` name each field, before anything is queued.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from appliance import jobs, profile, stages
from appliance.errors import InvalidRequest, ValidationError
from appliance.jobs import Job
from appliance.workspace import Workspace


class StageRequest(stages.Request, Protocol):
    """A typed request that names its job kind (`ExportRequest.kind == "export"`)."""

    kind: ClassVar[str]


def check_kind(kind: str) -> None:
    if kind not in stages.KINDS:
        raise ValidationError(f"unknown job kind {kind!r}; known: {', '.join(sorted(stages.KINDS))}")


def problems(kind: str, params: dict[str, Any]) -> dict[str, str]:
    """Field -> what is wrong, for a kind whose stage has a typed request (else nothing known)."""
    request = stages.REQUESTS.get(kind)
    if request is None:
        return {}
    try:
        return request.from_params(params).problems()
    except InvalidRequest as exc:  # a value from_params cannot even read (a word for a number)
        return dict(exc.problems)


def check(kind: str, params: dict[str, Any]) -> None:
    """Refuse a request before it is queued: an unknown kind, a kind this install's profile cannot
    run, or fields its stage finds wrong."""
    check_kind(kind)
    if kind in stages.FULL_PROFILE_KINDS:
        profile.require_full(stages.FULL_PROFILE_KINDS[kind])
    found = problems(kind, params)
    if found:
        raise InvalidRequest(f"the {kind} request is not valid", found)


def submit(ws: Workspace, kind: str, params: dict[str, Any]) -> Job:
    """Queue a job without starting it."""
    check(kind, params)
    return jobs.submit(ws, kind, params)


def start(ws: Workspace, kind: str, params: dict[str, Any]) -> Job:
    """Queue a job and start it detached: the caller can exit, the job goes on."""
    check(kind, params)
    return jobs.start(ws, kind, params)


def start_request(ws: Workspace, request: StageRequest) -> Job:
    """Queue a stage's typed request and start it detached (checked first, as `start` does)."""
    return start(ws, request.kind, request.to_params())


def run(ws: Workspace, job_id: str) -> Job:
    """Run a queued job in this process (what `appliance jobs run ID` does)."""
    return jobs.run(ws, job_id, stages.KINDS)
