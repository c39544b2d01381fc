"""The `train` job: the recipe run on this box, resumable from its last checkpoint."""

from __future__ import annotations

from typing import Any

from appliance.jobs import JobContext


def run(ctx: JobContext) -> dict[str, Any]:
    from appliance.stages.train.recipe import run_training

    return run_training(ctx)
