"""The `import-model` job: one model imported, resumable after its commit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.jobs import JobContext
from appliance.stages.models import importer


def run(ctx: JobContext) -> dict[str, Any]:
    """Resumed after its model was committed (killed before it was marked done), it is done."""
    p = ctx.params
    made = ctx.made_here("model") if ctx.attempt > 1 else None
    if made is not None:
        ctx.log(f"model {made.name} was already imported by this job: done")
        return {"model": made.name, "path": str(made.path)}
    ctx.finishes_with("model")
    if p.get("default"):
        record = importer.import_default(ctx.ws, name=p.get("name"), say=ctx.log, progress=ctx.progress)
    else:
        template = Path(p["chat_template"]) if p.get("chat_template") else None
        record = importer.import_path(ctx.ws, Path(p["path"]), name=p.get("name"),
                                      chat_template_file=template, say=ctx.log,
                                      progress=ctx.progress)
    return {"model": record.name, "path": str(record.path)}
