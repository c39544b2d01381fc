"""The `merge` job: a run merged into a full model (an `export` artifact)."""

from __future__ import annotations

from typing import Any

from appliance.jobs import JobContext


def run(ctx: JobContext) -> dict[str, Any]:
    from appliance.stages.export import pipeline

    p = ctx.params
    ctx.finishes_with("export")  # its one commit: the merged model (none if it exists already)
    record = pipeline.merge(ctx.ws, p["run"], dtype=p.get("dtype"), base=p.get("base"),
                            say=ctx.log, check_cancel=ctx.check_cancel, progress=ctx.progress)
    return {"export": record.name, "path": str(record.path)}
