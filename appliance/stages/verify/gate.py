"""The parity gate: each GGUF/ONNX artifact scored against the merged model it was made from,
before it is committed, and its verdict recorded with it (`parity.json`, status `ready` or
`failed`); `verify` runs the gate again on an existing export and swaps the new verdict in whole.

A `Gate` serves one job: the export job gates each artifact it makes through it (so the reference is
scored once for all of them, `scoring.Scoring`), the verify job the one export it checks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from appliance import licences, manifest
from appliance.errors import BusyError, ValidationError
from appliance.fsutil import atomic_write_text
from appliance.progress import QUIET, Reporter, Stages
from appliance.stages.merge.inputs import merged_name, run_inputs
from appliance.stages.verify import frontier, parity
from appliance.stages.verify.scoring import PARITY_MAX_TOKENS, Candidate, ReferenceMemo, Scoring, parity_data
from appliance.workspace import ArtifactRecord, ArtifactWriter, Workspace, parent_ref


class Gate:
    """The gate for one job's artifacts, reporting to `stages` and `report`; `overrides` replace
    thresholds of every type (an operator's recorded decision)."""

    def __init__(self, ws: Workspace, stages: Stages, report: Reporter = QUIET, *,
                 overrides: Mapping[str, float] | None = None, memo: ReferenceMemo | None = None) -> None:
        self.ws, self.stages, self.report = ws, stages, report
        self.overrides = dict(overrides or {})
        self.scoring = Scoring(stages, report, overrides=self.overrides, memo=memo)

    def check(self, merged: ArtifactRecord, name: str, kind: str, runtime: Any) -> dict[str, Any]:
        """The parity report of artifact `name` (type `kind`) loaded in its `runtime` (a scorer
        with the runtime's own `tokenize`), against `merged`."""
        from appliance.hfmodel import load_tokenizer

        run = manifest.read(merged.path)["config"]["run"]
        _, model, dataset = run_inputs(self.ws, run, hash_model=False)  # hashed when the merge was made
        tokenizer = load_tokenizer(merged.path)
        data, text = parity_data(model, dataset, tokenizer)
        same = runtime.tokenize(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
        verdict = self.scoring.parity_report(merged.path, merged.name, data,
                                             {name: Candidate(kind, runtime, same)})
        self.stages.emit("time-decode", f"timing {name}'s greedy decode on this box")
        verdict["artifacts"][0].update(frontier.decode_speed(runtime, data[0].input_ids))
        return verdict

    def commit(self, w: ArtifactWriter, verdict: dict[str, Any], merged: ArtifactRecord,
               config: dict[str, Any], summary: dict[str, Any],
               info: dict[str, Any] | None = None) -> None:
        """Commit the artifact being written in `w` with its parity report: `ready` if it passed,
        else `failed` (kept, and refused by the runtime unless overridden). `info`: more of the
        manifest's info (how the artifact was made: its importance matrix)."""
        (w.path / "parity.json").write_text(json.dumps(verdict, indent=2))
        passed = verdict["passed"]
        self.report.log(parity.table(verdict))
        self.stages.emit("record", f"recording {w.name} (hashing its files into the manifest)")
        carried = licences.carry(self.ws, [parent_ref(merged)], w.path)
        w.commit(parents=[parent_ref(merged)], config=config, status="ready" if passed else "failed",
                 info={**(info or {}), "summary": {**summary, "parity": "pass" if passed else "FAIL"},
                       "licenses": carried},
                 metrics={"parity": verdict["artifacts"][0]})

    def again(self, name: str) -> dict[str, Any]:
        """Gate the existing export `name` again and record the new verdict."""
        from export import gguf, onnx

        record = self.ws.get("export", name)
        self.stages.emit("check-files", f"checking {name}'s files against its manifest")
        data = manifest.verify(record.path)
        config = data["config"]
        if config.get("format") not in ("gguf", "onnx"):
            raise ValidationError(f"{name} is a merged model: it is the reference, not something to "
                                  "verify", hint="verify one of its GGUF or ONNX exports")
        merged = self.ws.get("export", merged_name(config["run"]))
        if config["format"] == "gguf":
            path = record.path / f"{config['run']}-{config['type']}.gguf"
            self.stages.emit("load-runtime", f"loading {path.name} in llama.cpp")
            with gguf.GgufLM(path, n_ctx=PARITY_MAX_TOKENS + 16) as lm:
                verdict = self.check(merged, name, config["type"].lower(), lm)
        else:
            self.stages.emit("load-runtime", f"loading {name} in onnxruntime")
            verdict = self.check(merged, name, config["precision"], onnx.OnnxLM(record.path / "onnx"))
        _rewrite_parity(self.ws, record, data, verdict)
        return verdict


def verify(ws: Workspace, name: str, *, overrides: Mapping[str, float] | None = None,
           report: Reporter = QUIET) -> dict[str, Any]:
    """Re-run the parity gate of an existing export and update its parity.json, status and manifest."""
    stages = Stages(report.progress, artifacts_total=1)
    stages.start(name)
    verdict = Gate(ws, stages, report, overrides=overrides).again(name)
    stages.finished(name)
    stages.done()
    return verdict


def _rewrite_parity(ws: Workspace, record: ArtifactRecord, data: dict[str, Any],
                    verdict: dict[str, Any]) -> None:
    """A new parity.json and manifest, made in a staging copy (hard links of the other files) and
    swapped in whole: a crash at any point leaves the old or the new artifact, never a mix."""
    from appliance.fsutil import link_or_copy, sha256_file

    with ws.writer("export", record.name, replace=True) as w:
        now = manifest.read(record.path)
        if now.get("created") != data.get("created") or now.get("files") != data.get("files"):
            raise BusyError(f"export {record.name!r} changed while it was being verified",
                            hint=f"verify it again: appliance verify {record.name}")
        for rel in data["files"]:
            if rel != "parity.json":
                link_or_copy(record.path / rel, w.path / rel)
        target = w.path / "parity.json"
        atomic_write_text(target, json.dumps(verdict, indent=2))
        data["files"]["parity.json"] = {"size": target.stat().st_size, "sha256": sha256_file(target)}
        data["status"] = "ready" if verdict["passed"] else "failed"
        data["info"].setdefault("summary", {})["parity"] = "pass" if verdict["passed"] else "FAIL"
        data["metrics"]["parity"] = verdict["artifacts"][0]
        w.commit_manifest(data)
    ws.audit("verify", kind="export", name=record.name, passed=verdict["passed"])
