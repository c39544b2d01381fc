"""The `export` job: a run merged, converted and quantized, each artifact parity-gated. A cancel
keeps the intermediate files for `jobs resume`; success or a failure frees them."""

from __future__ import annotations

import shutil
from typing import Any

from appliance import cancellation
from appliance.jobs import JobCancelled, JobContext


def run(ctx: JobContext) -> dict[str, Any]:
    """params {run, format: gguf|onnx|plan, types: [...], overrides: {threshold key: value},
    imatrix: auto|off|FILE (GGUF, plan), calibrate: auto|off (ONNX, plan); older rows have none:
    auto}. A plan exports its GGUF types, then its ONNX precisions, in this one job."""
    from appliance.stages.export import convert
    from appliance.stages.export.request import ExportRequest, types_by_format

    p = ctx.params
    request = ExportRequest.from_params(p)
    ctx.finishes_with("export", last_artifact_name(p))
    gguf, onnx = types_by_format(p["format"], p["types"])
    records = []
    memo = convert.ReferenceMemo()  # the merged model scored once for the job, GGUF and ONNX alike
    try:
        if gguf or p["format"] == "gguf":  # no type: only the merged model
            records += convert.export_gguf(ctx.ws, p["run"], gguf, scratch=ctx.dir / "work",
                                           overrides=p.get("overrides"), report=ctx,
                                           imatrix=request.imatrix, memo=memo)
        if onnx or p["format"] == "onnx":
            records += convert.export_onnx(ctx.ws, p["run"], onnx, scratch=ctx.dir / "work",
                                           overrides=p.get("overrides"), report=ctx,
                                           calibrate=request.calibrate, memo=memo)
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
    from appliance.stages.export.request import types_by_format
    from appliance.stages.merge.inputs import merged_name

    gguf, onnx = types_by_format(p["format"], [str(t) for t in p["types"]])
    if gguf:
        from export.gguf import resolve_quant_type

        gguf = [resolve_quant_type(t)[0] for t in gguf]
    names = ([artifact_name(p["run"], "gguf", t) for t in dict.fromkeys(gguf)]
             + [artifact_name(p["run"], "onnx", t) for t in dict.fromkeys(onnx)])
    return names[-1] if names else merged_name(p["run"])
