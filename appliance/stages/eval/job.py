"""The `eval` job: targets answer held-out items; a resumed job keeps the answers it has."""

from __future__ import annotations

from typing import Any

from appliance.jobs import JobContext


def run(ctx: JobContext) -> dict[str, Any]:
    from appliance.stages.eval.evaluate import evaluate
    from appliance.stages.eval.request import EvalRequest

    request = EvalRequest.from_params(ctx.params)
    made = ctx.made_here("eval")
    if made is not None:  # killed after its commit, before it was marked done
        return {"eval": made.name, "path": str(made.path)}
    ctx.finishes_with("eval")
    doc = evaluate(ctx.ws, request, ctx.dir / "eval", default_name=f"eval-{ctx.job.id}",
                   attempt=ctx.attempt, report=ctx)
    path = ctx.ws.get("eval", doc["name"]).path
    return {"eval": doc["name"], "path": str(path), "report": str(path / "report.md")}
