"""The pipeline's stages as job kinds: the one table the job runner is given.

`appliance.jobs` is a state machine that knows no stage (SQLite rows, spawning, cancel, resume);
this module maps each stored job kind to the function that runs it, so the stages import the
runner and never the other way round. Adding a stage is one function here and one line in
`KINDS`; the stored kind names must never change (jobs written by an older version resume).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from appliance import cancellation
from appliance.errors import ApplianceError
from appliance.jobs import JobCancelled, JobContext, JobFunction
from appliance.stages.export import ExportRequest
from appliance.workspace import ArtifactRecord


def _import_model(ctx: JobContext) -> dict[str, Any]:
    """Resumed after its model was committed (killed before it was marked done), it is done."""
    from appliance import models

    p = ctx.params
    made = _made_by_this_job(ctx, "model") if ctx.attempt > 1 else None
    if made is not None:
        ctx.log(f"model {made.name} was already imported by this job: done")
        return {"model": made.name, "path": str(made.path)}
    ctx.finishes_with("model")
    if p.get("default"):
        record = models.import_default(ctx.ws, name=p.get("name"), say=ctx.log, progress=ctx.progress)
    else:
        template = Path(p["chat_template"]) if p.get("chat_template") else None
        record = models.import_path(ctx.ws, Path(p["path"]), name=p.get("name"),
                                    chat_template_file=template, say=ctx.log,
                                    progress=ctx.progress)
    return {"model": record.name, "path": str(record.path)}


def _made_by_this_job(ctx: JobContext, kind: str) -> ArtifactRecord | None:
    """The artifact of `kind` whose manifest names this job as its maker, if any."""
    from appliance import manifest

    for record in ctx.ws.list(kind):
        with contextlib.suppress(ApplianceError):
            if manifest.read(record.path).get("config", {}).get("job") == ctx.job.id:
                return record
    return None


def _selftest(ctx: JobContext) -> dict[str, Any]:
    """Counts to `steps`, one step per `interval` seconds, keeping its position in a checkpoint:
    lets an operator (and the tests) check detaching, cancel, kill and resume on this box.

    `load` seconds first stand for a phase that never checks for a cancel (a model load), spent
    in this process or, with `child`, waiting on a child process (a converter)."""
    steps, interval = int(ctx.params.get("steps", 10)), float(ctx.params.get("interval", 0.5))
    load = float(ctx.params.get("load", 0))
    checkpoint = ctx.dir / "checkpoint.json"
    done = json.loads(checkpoint.read_text())["step"] if checkpoint.exists() else 0
    if load:
        ctx.progress(0, 0, stage="load", label=f"loading (simulated, {load:g} s)", unit="")
        if ctx.params.get("child"):
            subprocess.run([sys.executable, "-c", f"import time; time.sleep({load})"], check=True)
        else:
            time.sleep(load)
    ctx.log(f"attempt {ctx.attempt}: starting at step {done} of {steps}")
    with ctx.cooperative():
        while done < steps:
            ctx.check_cancel()
            time.sleep(interval)
            done += 1
            tmp = checkpoint.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": done}))
            tmp.replace(checkpoint)
            ctx.progress(done, steps)
    return {"steps": done}


def _train(ctx: JobContext) -> dict[str, Any]:
    from appliance.train import run_training

    return run_training(ctx)


def _merge(ctx: JobContext) -> dict[str, Any]:
    from appliance import exports

    p = ctx.params
    ctx.finishes_with("export")  # its one commit: the merged model (none if it exists already)
    record = exports.merge(ctx.ws, p["run"], dtype=p.get("dtype"), base=p.get("base"),
                           say=ctx.log, check_cancel=ctx.check_cancel, progress=ctx.progress)
    return {"export": record.name, "path": str(record.path)}


def _export(ctx: JobContext) -> dict[str, Any]:
    """params {run, format: gguf|onnx, types: [...], overrides: {threshold key: value}}"""
    from appliance import exports

    p = ctx.params
    func = exports.export_gguf if p["format"] == "gguf" else exports.export_onnx
    ctx.finishes_with("export", _last_export_name(p))
    try:
        records = func(ctx.ws, p["run"], p["types"], scratch=ctx.dir / "work",
                       overrides=p.get("overrides"), say=ctx.log, check_cancel=ctx.check_cancel,
                       progress=ctx.progress)
    except JobCancelled:
        raise  # resumable: keep the intermediate files
    except BaseException:
        if not cancellation.interrupted():  # a failure (a full disk...) frees them
            shutil.rmtree(ctx.dir / "work", ignore_errors=True)
        raise
    shutil.rmtree(ctx.dir / "work", ignore_errors=True)  # intermediate F16 GGUF / fp32 ONNX
    return {"exports": {r.name: r.status for r in records}}


def _last_export_name(p: dict[str, Any]) -> str:
    """The artifact an export job writes last, named as `exports` names them (the merged model if
    no type is asked for): its commit ends the job."""
    from appliance.exports import artifact_name, merged_name

    types = [str(t) for t in p["types"]]
    if p["format"] == "gguf":
        from export.gguf import resolve_quant_type

        types = [resolve_quant_type(t)[0] for t in types]
    names = [artifact_name(p["run"], p["format"], t) for t in dict.fromkeys(types)]
    return names[-1] if names else merged_name(p["run"])


def _verify(ctx: JobContext) -> dict[str, Any]:
    from appliance import exports

    ctx.finishes_with("export")  # its one commit: the export with its new verdict
    report = exports.verify(ctx.ws, ctx.params["export"], overrides=ctx.params.get("overrides"),
                            say=ctx.log, check_cancel=ctx.check_cancel, progress=ctx.progress)
    return {"passed": report["passed"]}


def _serve(ctx: JobContext) -> dict[str, Any]:
    """The API server as a job: runs until cancelled (which is how it is stopped)."""
    from appliance.runtime import service

    return service.run_job(ctx)


class Request(Protocol):
    """A stage's typed request (see `appliance.stages.export.ExportRequest`)."""

    def problems(self) -> dict[str, str]: ...

    def to_params(self) -> dict[str, Any]: ...


class RequestType(Protocol):
    def from_params(self, params: Mapping[str, Any]) -> Request: ...


# The stages whose requests are typed so far: checked before a job is queued (`appliance.api`).
REQUESTS: dict[str, RequestType] = {"export": ExportRequest}

# The registry: a job kind's name (stored in the database: never rename one) -> its function.
KINDS: dict[str, JobFunction] = {
    "import-model": _import_model,
    "selftest": _selftest,
    "train": _train,
    "merge": _merge,
    "export": _export,
    "verify": _verify,
    "serve": _serve,
}

