"""The front ends' one door to the pipeline: the CLI, the TUI and the demo start jobs here.

It joins the job runner (`appliance.jobs`, which knows no stage) to the registry of stages
(`appliance.stages.KINDS`), so a job of a kind this version cannot run is refused before it is
queued, and a front end never needs to know where a stage lives.
"""

from __future__ import annotations

from typing import Any

from appliance import jobs, stages
from appliance.errors import InvalidRequest, ValidationError
from appliance.jobs import Job
from appliance.workspace import Workspace


def check_kind(kind: str) -> None:
    if kind not in stages.KINDS:
        raise ValidationError(f"unknown job kind {kind!r}; known: {', '.join(sorted(stages.KINDS))}")


def problems(kind: str, params: dict[str, Any]) -> dict[str, str]:
    """Field -> what is wrong, for a kind whose stage has a typed request (else nothing known)."""
    request = stages.REQUESTS.get(kind)
    return request.from_params(params).problems() if request is not None else {}


def check(kind: str, params: dict[str, Any]) -> None:
    """Refuse a request before it is queued: an unknown kind, or fields its stage finds wrong."""
    check_kind(kind)
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


def run(ws: Workspace, job_id: str) -> Job:
    """Run a queued job in this process (what `appliance jobs run ID` does)."""
    return jobs.run(ws, job_id, stages.KINDS)
