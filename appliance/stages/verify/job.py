"""The `verify` job: an export's parity verdict measured again and recorded."""

from __future__ import annotations

from typing import Any

from appliance.jobs import JobContext


def run(ctx: JobContext) -> dict[str, Any]:
    from appliance.stages.verify.gate import verify

    ctx.finishes_with("export")  # its one commit: the export with its new verdict
    verdict = verify(ctx.ws, ctx.params["export"], overrides=ctx.params.get("overrides"), report=ctx)
    return {"passed": verdict["passed"]}
