"""The `verify` job: an export's parity verdict measured again and recorded."""

from __future__ import annotations

from typing import Any

from appliance.jobs import JobContext


def run(ctx: JobContext) -> dict[str, Any]:
    from appliance.stages.export import pipeline

    ctx.finishes_with("export")  # its one commit: the export with its new verdict
    report = pipeline.verify(ctx.ws, ctx.params["export"], overrides=ctx.params.get("overrides"),
                             say=ctx.log, check_cancel=ctx.check_cancel, progress=ctx.progress)
    return {"passed": report["passed"]}
