"""The export stage's typed request: defaults and choices defined once, problems named by field,
and the door refusing a bad request before anything is queued."""

from __future__ import annotations

import pytest

from appliance import api, jobs
from appliance.errors import InvalidRequest, ValidationError
from appliance.stages.export import DEFAULT_TYPES, ONNX_PRECISIONS, ExportRequest
from appliance.workspace import Workspace


def test_the_onnx_precisions_offered_are_the_ones_the_converter_makes() -> None:
    from export import onnx

    assert set(ONNX_PRECISIONS) == set(onnx.PRECISIONS)


def test_a_good_request_has_no_problems_and_round_trips_through_params() -> None:
    request = ExportRequest("r", "gguf", ("q4_k", "Q8_0"), {"kl": 0.5})
    assert request.problems() == {}
    assert ExportRequest.from_params(request.to_params()) == request
    assert ExportRequest("r").types == DEFAULT_TYPES["gguf"]


def test_a_plan_takes_gguf_types_and_onnx_precisions_in_one_job() -> None:
    from appliance.stages.export.job import last_artifact_name
    from appliance.stages.export.request import split_types

    plan = ExportRequest("r", "plan", ("q8_0", "int8", "Q4_K_M", "int4"), calibrate="off")
    assert plan.problems() == {} and ExportRequest.from_params(plan.to_params()) == plan
    assert split_types(plan.types) == (["q8_0", "Q4_K_M"], ["int8", "int4"])
    assert last_artifact_name(plan.to_params()) == "r-onnx-int4"  # GGUF first, then ONNX
    assert last_artifact_name(ExportRequest("r", "plan", ("q8_0",)).to_params()) == "r-gguf-q8_0"


def test_old_params_with_unknown_keys_still_load() -> None:
    request = ExportRequest.from_params({"run": "r", "format": "onnx", "types": ["int4"], "gone": 1})
    assert request == ExportRequest("r", "onnx", ("int4",))
    older = ExportRequest.from_params({"run": "r", "format": "gguf", "types": ["Q4_K_M"]})
    assert older.imatrix == "auto" and older.to_params()["imatrix"] == "auto"
    onnx = ExportRequest.from_params({"run": "r", "format": "onnx", "types": ["int4"]})
    assert onnx.calibrate == "auto" and onnx.to_params()["calibrate"] == "auto"
    off = ExportRequest("r", "onnx", ("int4",), calibrate="off")
    assert ExportRequest.from_params(off.to_params()) == off
    assert "calibrate" not in ExportRequest("r").to_params()  # GGUF: the imatrix instead


@pytest.mark.parametrize(("request_", "field", "words"), [
    (ExportRequest("r", "gguf", ("Q4_K_M", "Q3_X")), "types", "unknown quantization type 'Q3_X'"),
    (ExportRequest("r", "gguf", ("IQ2_XXS",), imatrix="off"), "types", "importance matrix"),
    (ExportRequest("r", "gguf", ("Q4_K_M",), imatrix="/no/such.imatrix"), "imatrix", "/no/such.imatrix"),
    (ExportRequest("r", "onnx", ("int4",), imatrix="off"), "imatrix", "GGUF exports only"),
    (ExportRequest("r", "onnx", ("int4",), calibrate="yes"), "calibrate", "unknown choice 'yes'"),
    (ExportRequest("r", "gguf", ("Q4_K_M",), calibrate="off"), "calibrate", "importance matrix"),
    (ExportRequest("r", "plan", ("Q8_0", "int3")), "types", "nor an ONNX precision"),
    (ExportRequest("r", "plan", ()), "types", "at least one candidate"),
    (ExportRequest("r", "onnx", ("int3",)), "types", "unknown ONNX precision 'int3'"),
    (ExportRequest("r", "safetensors", ()), "format", "unknown format"),
    (ExportRequest("", "gguf", ("Q8_0",)), "run", "finished run"),
])
def test_each_problem_is_named_by_its_field(request_: ExportRequest, field: str, words: str) -> None:
    found = request_.problems()
    assert list(found) == [field] and words in found[field], found


def test_the_door_refuses_a_bad_type_before_queueing_a_job(workspace: Workspace) -> None:
    """A typo in the TUI's "more types" field became a job that failed minutes later."""
    bad = ExportRequest("r", "gguf", ("Q8_0", "Q3_X")).to_params()
    with pytest.raises(InvalidRequest) as err:
        api.start(workspace, "export", bad)
    assert isinstance(err.value, ValidationError) and list(err.value.problems) == ["types"]
    assert "Q3_X" in err.value.message
    assert jobs.list_jobs(workspace) == []
