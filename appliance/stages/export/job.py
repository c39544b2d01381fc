"""The `export` job: a run merged, converted and quantized, each artifact parity-gated. A cancel
keeps the intermediate files for `jobs resume`; success or a failure frees them."""

from __future__ import annotations

import shutil
from typing import Any

from appliance import cancellation
from appliance.jobs import JobCancelled, JobContext


def run(ctx: JobContext) -> dict[str, Any]:
    """params {run, format: gguf|onnx, types: [...], overrides: {threshold key: value},
    imatrix: auto|off|FILE (GGUF only), calibrate: auto|off (ONNX only); older rows have none: auto}"""
    from appliance.stages.export import convert
    from appliance.stages.export.request import ExportRequest

    p = ctx.params
    ctx.finishes_with("export", last_artifact_name(p))
    try:
        if p["format"] == "gguf":
            records = convert.export_gguf(ctx.ws, p["run"], p["types"], scratch=ctx.dir / "work",
                                          overrides=p.get("overrides"), report=ctx,
                                          imatrix=ExportRequest.from_params(p).imatrix)
        else:
            records = convert.export_onnx(ctx.ws, p["run"], p["types"], scratch=ctx.dir / "work",
                                          overrides=p.get("overrides"), report=ctx,
                                          calibrate=ExportRequest.from_params(p).calibrate)
    except JobCancelled:
        raise  # resumable: keep the intermediate files
    except BaseException:
        if not cancellation.interrupted():  # a failure (a full disk...) frees them
            shutil.rmtree(ctx.dir / "work", ignore_errors=True)
        raise
    shutil.rmtree(ctx.dir / "work", ignore_errors=True)  # intermediate F16 GGUF / fp32 ONNX
    return {"exports": {r.name: r.status for r in records}}


def last_artifact_name(p: dict[str, Any]) -> str:
    """The artifact an export job writes last, named as `convert` names them (the merged model
    if no type is asked for): its commit ends the job."""
    from appliance.stages.export.convert import artifact_name
    from appliance.stages.merge.inputs import merged_name

    types = [str(t) for t in p["types"]]
    if p["format"] == "gguf":
        from export.gguf import resolve_quant_type

        types = [resolve_quant_type(t)[0] for t in types]
    names = [artifact_name(p["run"], p["format"], t) for t in dict.fromkeys(types)]
    return names[-1] if names else merged_name(p["run"])
