"""The merge, export and verify jobs commit their result last, and from right before that commit
nothing interrupts them (`JobContext.finishes_with`): a cancel then cannot report a job cancelled
whose result is in place. Every artifact a job writes names the job in its manifest. The export
functions are stand-ins that commit through the job's workspace, as the real ones do."""

from __future__ import annotations

from typing import Any

import pytest

from appliance import api, cancellation, jobs, manifest, stages
from appliance.stages.export import convert
from appliance.stages.export import job as export_job
from appliance.stages.merge import merged
from appliance.stages.verify import gate
from appliance.workspace import ArtifactRecord, Workspace


class Committer:
    """Commits the named exports in order, noting whether the job was finishing after each."""

    def __init__(self, *names: str, replace: bool = False) -> None:
        self.names, self.replace = names, replace
        self.finishing: list[bool] = []

    def commit_all(self, ws: Workspace) -> list[ArtifactRecord]:
        for name in self.names:
            with ws.writer("export", name, replace=self.replace) as w:
                (w.path / "weights.bin").write_bytes(b"w")
                w.commit(config={"run": "r"})
            self.finishing.append(cancellation._main.finishing)
        return [ws.get("export", n) for n in self.names]


def _run(ws: Workspace, kind: str, params: dict[str, Any]) -> jobs.Job:
    job = api.run(ws, jobs.submit(ws, kind, params).id)
    assert job.state == "succeeded", job.message
    return job


def test_an_export_job_finishes_at_the_commit_of_its_last_artifact(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    made = Committer("r-merged", "r-onnx-fp16", "r-onnx-int8")
    monkeypatch.setattr(convert, "export_onnx", lambda ws, *_, **__: made.commit_all(ws))
    job = _run(workspace, "export", {"run": "r", "format": "onnx", "types": ["fp16", "int8"]})
    assert made.finishing == [False, False, True]
    for name in made.names:
        path = workspace.get("export", name).path
        assert manifest.read(path)["config"] == {"run": "r", "job": job.id}


@pytest.mark.parametrize(("kind", "params", "replace"), [
    ("merge", {"run": "r"}, False),
    ("verify", {"export": "r-merged"}, True),
])
def test_a_merge_or_verify_job_finishes_at_its_one_commit(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch, kind: str, params: dict[str, Any],
        replace: bool) -> None:
    made = Committer("r-merged", replace=replace)
    monkeypatch.setattr(merged, "merge", lambda ws, *_, **__: made.commit_all(ws)[0])
    monkeypatch.setattr(gate, "verify", lambda ws, *_, **__: made.commit_all(ws) and {"passed": True})
    _run(workspace, kind, params)
    assert made.finishing == [True]
    config = manifest.read(workspace.get("export", "r-merged").path)["config"]
    assert ("job" in config) is not replace  # a rewrite keeps who made the artifact


def test_the_last_export_is_named_as_exports_names_it() -> None:
    gguf = {"run": "r", "format": "gguf", "types": ["Q8_0", "q4_k", "q8_0"]}
    assert export_job.last_artifact_name(gguf) == "r-gguf-q4_k_m"  # the order of first mention
    assert export_job.last_artifact_name({"run": "r", "format": "onnx", "types": ["int4"]}) == "r-onnx-int4"
    assert export_job.last_artifact_name({"run": "r", "format": "onnx", "types": []}) == "r-merged"


def test_a_job_that_declares_no_result_is_not_finishing_after_a_commit(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit in the middle of a job leaves it interruptible (a train job publishes, and calls
    `finishing` itself)."""
    made = Committer("r-merged")

    def commits_then_works(ctx: jobs.JobContext) -> None:
        made.commit_all(ctx.ws)
        assert cancellation.interruptible()

    monkeypatch.setitem(stages.KINDS, "under-test", commits_then_works)
    _run(workspace, "under-test", {})
    assert made.finishing == [False]

