"""The `merge` job: a run merged into a full model (an `export` artifact)."""

from __future__ import annotations

from typing import Any

from appliance.jobs import JobContext


def run(ctx: JobContext) -> dict[str, Any]:
    from appliance.stages.merge.merged import merge

    p = ctx.params
    ctx.finishes_with("export")  # its one commit: the merged model (none if it exists already)
    record = merge(ctx.ws, p["run"], dtype=p.get("dtype"), base=p.get("base"), report=ctx)
    return {"export": record.name, "path": str(record.path)}
