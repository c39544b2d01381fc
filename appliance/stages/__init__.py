"""The pipeline's stages as job kinds: the one table the job runner is given.

Each stage is a package here (`models`, `datasets`, `train`, `merge`, `export`, `verify`, `bundle`,
`eval`; serving is `appliance.runtime`) holding its code, its typed request (`request.py`) and its
job function (`job.run`). `appliance.jobs` is a state machine that knows no stage (SQLite rows, spawning,
cancel, resume): it is handed `KINDS`, which names each job function by module, loaded only when a
job of that kind runs (so `appliance --help` and the TUI load no stage they do not use).

Adding a stage is its package and one line in `KINDS` (and in `REQUESTS` for its request). The
stored kind names must never change: jobs written by an older version resume.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol

from appliance.jobs import JobContext, JobFunction
from appliance.stages.bundle.request import BundleCreateRequest, BundleImportRequest
from appliance.stages.eval.request import EvalRequest
from appliance.stages.export.request import ExportRequest
from appliance.stages.merge.request import MergeRequest
from appliance.stages.models.request import ImportModelRequest
from appliance.stages.train.request import TrainRequest
from appliance.stages.verify.request import VerifyRequest


class StageJob:
    """A job function named by module and attribute, imported when a job of its kind runs."""

    def __init__(self, module: str, function: str = "run") -> None:
        self.module, self.function = module, function

    def load(self) -> JobFunction:
        func: JobFunction = getattr(importlib.import_module(self.module), self.function)
        return func

    def __call__(self, ctx: JobContext) -> dict[str, Any] | None:
        return self.load()(ctx)

    def __repr__(self) -> str:
        return f"StageJob({self.module}:{self.function})"


class Request(Protocol):
    """A stage's typed request (see `appliance.stages.export.ExportRequest`)."""

    def problems(self) -> dict[str, str]: ...

    def to_params(self) -> dict[str, Any]: ...


class RequestType(Protocol):
    def from_params(self, params: Mapping[str, Any]) -> Request: ...


# The stages whose requests are typed so far: checked before a job is queued (`appliance.api`).
REQUESTS: dict[str, RequestType] = {
    "import-model": ImportModelRequest,
    "train": TrainRequest,
    "merge": MergeRequest,
    "export": ExportRequest,
    "verify": VerifyRequest,
    "bundle-create": BundleCreateRequest,
    "bundle-import": BundleImportRequest,
    "eval": EvalRequest,
}

# The kinds only the full profile can run (torch, transformers, peft: `appliance.profile`) -> what
# the refusal calls them. An edge install refuses them at the door, in one line; the TUI greys them.
FULL_PROFILE_KINDS: dict[str, str] = {
    "train": "training",
    "merge": "merging",
    "export": "exporting a run",
    "verify": "the parity check",
    "eval": "evaluation",
}

# The registry: a job kind's name (stored in the database: never rename one) -> its function.
KINDS: dict[str, JobFunction] = {
    "import-model": StageJob("appliance.stages.models.job"),
    "selftest": StageJob("appliance.stages.selftest"),
    "train": StageJob("appliance.stages.train.job"),
    "merge": StageJob("appliance.stages.merge.job"),
    "export": StageJob("appliance.stages.export.job"),
    "verify": StageJob("appliance.stages.verify.job"),
    "serve": StageJob("appliance.runtime.service", "run_job"),
    "bundle-create": StageJob("appliance.stages.bundle.job", "run_create"),
    "bundle-import": StageJob("appliance.stages.bundle.job", "run_import"),
    "eval": StageJob("appliance.stages.eval.job"),
}
