"""From a run's merged model to deployable artifacts, each checked by the parity gate.

Artifacts (kind `export`, under `exports/`), one per deployable thing:
- `<run>-merged`: made first if it is not there yet (the merge stage, `appliance.stages.merge.merged`);
- `<run>-gguf-<type>`: one GGUF (F16, Q8_0, Q4_K_M, ...) with its Ollama `Modelfile`; below 6 bits
  quantized with an importance matrix made once per job from the run's training conversations
  (`importance`), kept beside it with the conversations' hashes and recorded in its manifest;
- `<run>-onnx-<precision>`: one ONNX folder (fp32, fp16, int8, int4), self-contained.
Every GGUF/ONNX artifact is scored against the merged model before it is committed
(`appliance.stages.verify.gate`); its `parity.json` holds the verdict and a failing one is
registered with status `failed`.

Each step is idempotent: an artifact that exists and still matches its manifest is reused.

`export_gguf` and `export_onnx` report through `report` (`appliance.progress.Reporter`: log lines,
staged progress, the cancel check; the export job passes its `JobContext`): which artifact, which
stage, counts only where they are really known, so the CLI and the TUI can draw it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import licences, manifest
from appliance.errors import ApplianceError, ValidationError
from appliance.fsutil import disk_full_as_error, sha256_file
from appliance.progress import QUIET, Reporter, Stages
from appliance.stages.export import importance, layout
from appliance.stages.merge.inputs import existing
from appliance.stages.merge.merged import merged_model
from appliance.stages.verify.gate import Gate
from appliance.stages.verify.scoring import PARITY_MAX_TOKENS, ReferenceMemo
from appliance.workspace import ArtifactRecord, Workspace, parent_ref

_RECORD = re.compile(r"^(?:[A-Z]+:|Traceback|\w+(?:Error|Exception)\b)")  # a new log record begins


def tool_lines(say: Callable[[str], None]) -> Callable[[str], None]:
    """llama.cpp's converter and quantizer print a line per tensor, and the converter a progress
    bar many times a second (the staged progress counts it): keep the rest. An INFO record that
    is dropped drops its continuation lines too (the chat template is logged whole, one line of
    Jinja after another), up to the next record."""
    dropping = False

    def inner(line: str) -> None:
        nonlocal dropping
        if dropping and not _RECORD.match(line):
            return
        dropping = line.startswith("INFO:") and not re.search(r"architecture|successfully", line)
        if (dropping or "-->" in line or "falling back to" in line or line.startswith(("llama_", "Writing:"))
                or re.match(r"\s*\[\s*\d+/\s*\d+\]", line)):
            return
        say(line)
    return inner


def artifact_name(run: str, fmt: str, kind: str) -> str:
    """An exported artifact's name: `<run>-gguf-q4_k_m`, `<run>-onnx-int4` (the job's result)."""
    return f"{run}-{fmt}-{kind.lower()}"


@dataclass
class _Export:
    """One export call: its artifacts are made from `merged`, gated by `gate`, reported to
    `stages` (each artifact counted) and `report`."""

    ws: Workspace
    run: str
    merged: ArtifactRecord
    gate: Gate

    @property
    def stages(self) -> Stages:
        return self.gate.stages

    @property
    def report(self) -> Reporter:
        return self.gate.report

    @property
    def licences(self) -> list[dict[str, Any]]:
        """The base model's and the datasets' licences (appliance.licences)."""
        return licences.ancestors(self.ws, [parent_ref(self.merged)])


def _start(ws: Workspace, run: str, total: int, overrides: Mapping[str, float] | None,
           report: Reporter, memo: ReferenceMemo | None = None) -> _Export:
    """The merged model first (made, or found and reused), inside the export's stages."""
    stages = Stages(report.progress, artifacts_total=total)
    gate = Gate(ws, stages, report, overrides=overrides, memo=memo)
    merged = merged_model(ws, run, stages, report, memo=gate.scoring.memo)
    return _Export(ws, run, merged, gate)


# -- GGUF ----------------------------------------------------------------------------------------
def export_gguf(ws: Workspace, run: str, quants: list[str], *, scratch: Path,
                overrides: Mapping[str, float] | None = None, imatrix: str = "auto",
                report: Reporter = QUIET, memo: ReferenceMemo | None = None) -> list[ArtifactRecord]:
    """`imatrix`: auto, off or an imatrix file (`importance.plan`); refusals come before any work.
    `memo`: the job's reference logits (a plan's ONNX half scores against the same ones)."""
    from export import gguf

    names = [gguf.resolve_quant_type(q)[0] for q in quants]  # unknown types fail before any work
    plan = importance.plan(imatrix, names, report.log)
    todo = {artifact_name(run, "gguf", q): q for q in names}
    job = _start(ws, run, len(todo), overrides, report, memo)
    base = scratch / f"{run}-F16.gguf"
    source = importance.Source(ws, run, plan, scratch, job.stages, report)

    def make(qtype: str) -> ArtifactRecord:
        if not base.exists():  # converted once, for every type of this job
            scratch.mkdir(parents=True, exist_ok=True)
            gguf.convert(job.merged.path, base, progress=tool_lines(report.log),
                         counts=job.stages.counter("convert", "converting to GGUF F16", "%"),
                         metadata=licences.gguf_metadata(job.licences))
        return _one_gguf(job, qtype, base, source)

    file_sha = sha256_file(plan.file) if plan.file else None

    def same(name: str, qtype: str, found: ArtifactRecord) -> None:
        why = importance.existing_mismatch(manifest.read(found.path).get("info") or {},
                                           qtype in plan.types, file_sha)
        _reuse_or_refuse(report, name, why, refuse=plan.choice != importance.AUTO)

    return _each(job, todo, make, same)


def _quantized(job: _Export, qtype: str, base: Path, path: Path, source: importance.Source
               ) -> dict[str, Any]:
    """Quantize `base` to `path` (with the job's importance matrix where the plan says so); the
    manifest's record of the importance matrix."""
    from export import gguf, imatrix

    made = source.get(base, job.merged.path, qtype)
    counts = job.stages.counter("quantize", f"quantizing to {qtype}", "tensors")
    if made is None:
        gguf.quantize(base, path, qtype, progress=tool_lines(job.report.log), counts=counts)
        return {"used": False, "why": source.reason(qtype)}
    file, record = made
    imatrix.quantize(base, path, gguf.resolve_quant_type(qtype)[1], qtype, file,
                     progress=tool_lines(job.report.log), counts=counts)
    return {**record, "file": importance.IMATRIX_FILE}


def _imatrix_files(w: Any, record: dict[str, Any], source: importance.Source) -> None:
    """The importance matrix used (and the calibration's hashes) beside the GGUF, so the manifest
    hashes them and `--imatrix FILE` can use it again."""
    if not record.get("used"):
        return
    shutil.copy2(source.scratch / importance.IMATRIX_FILE if record["source"] == "run"
                 else Path(record["path"]), w.path / importance.IMATRIX_FILE)
    if record["source"] == "run":
        shutil.copy2(source.scratch / importance.CALIBRATION_FILE, w.path / importance.CALIBRATION_FILE)


def _one_gguf(job: _Export, qtype: str, base: Path, source: importance.Source) -> ArtifactRecord:
    from export import gguf, ollama

    name = artifact_name(job.run, "gguf", qtype)
    with job.ws.writer("export", name) as w:
        path = w.path / f"{job.run}-{qtype}.gguf"
        if qtype == "F16":
            shutil.copy2(base, path)
            record: dict[str, Any] = {"used": False, "why": source.reason(qtype)}
        else:
            record = _quantized(job, qtype, base, path, source)
        _imatrix_files(w, record, source)
        job.report.log(f"checking {path.name}")
        job.stages.emit("check", f"checking {path.name}")
        check = gguf.check_gguf(path, job.merged.path)
        ollama.write_modelfile(path, job.merged.path, out=w.path / "Modelfile",
                               licences=licences.texts(job.licences))
        (w.path / "gguf_check.json").write_text(json.dumps(check, indent=2, default=str))
        job.stages.emit("load-runtime", f"loading {path.name} in llama.cpp")
        with gguf.GgufLM(path, n_ctx=PARITY_MAX_TOKENS + 16) as lm:
            verdict = job.gate.check(job.merged, name, qtype.lower(), lm)
        job.gate.commit(w, verdict, job.merged, {"format": "gguf", "type": qtype, "run": job.run},
                        {"format": "gguf", "type": qtype, "run": job.run, "file": path.name,
                         "imatrix": bool(record.get("used"))}, info={"imatrix": record})
    return job.ws.get("export", name)


# -- ONNX ----------------------------------------------------------------------------------------
def export_onnx(ws: Workspace, run: str, precisions: list[str], *, scratch: Path,
                overrides: Mapping[str, float] | None = None, calibrate: str = layout.AUTO,
                report: Reporter = QUIET, memo: ReferenceMemo | None = None) -> list[ArtifactRecord]:
    """`calibrate`: auto (int4 keeps at 8 bits the weights measured most sensitive on the run's
    training conversations) or off (the fixed layout); `appliance.stages.export.layout`. `memo`: as
    for `export_gguf`."""
    from export import onnx

    bad = [p for p in precisions if p not in onnx.PRECISIONS]
    if bad:
        raise ValidationError(f"unknown ONNX precision {bad[0]!r}; valid: {', '.join(onnx.PRECISIONS)}")
    if calibrate not in layout.CHOICES:
        raise ValidationError(f"unknown --calibrate {calibrate!r}; valid: {', '.join(layout.CHOICES)}")
    todo = {artifact_name(run, "onnx", p): p for p in precisions}
    job = _start(ws, run, len(todo), overrides, report, memo)
    plan = layout.Layout(ws, run, calibrate, scratch, job.stages, report)

    def same(name: str, precision: str, found: ArtifactRecord) -> None:
        if precision not in ("int4", onnx.INT4_CUDA):
            return
        why = layout.existing_mismatch(manifest.read(found.path).get("info") or {},
                                       calibrate == layout.AUTO)
        _reuse_or_refuse(report, name, why, refuse=calibrate != layout.AUTO)

    return _each(job, todo, lambda p: _one_onnx(job, p, scratch, plan), same)


def _fp32_graph(job: _Export, fp32: Path) -> None:
    """The job's fp32 graph, exported once for every quantized type of the job."""
    from export import onnx

    if not (fp32 / onnx.MODEL_FILE).exists():
        shutil.rmtree(fp32, ignore_errors=True)
        job.stages.emit("export-onnx", "exporting the fp32 ONNX graph")
        onnx.export_onnx(job.merged.path, fp32, "fp32", progress=job.report.log)


def _one_onnx(job: _Export, precision: str, scratch: Path, plan: layout.Layout) -> ArtifactRecord:
    from export import onnx

    name = artifact_name(job.run, "onnx", precision)
    fp32 = scratch / "onnx-fp32"
    info: dict[str, Any] = {}
    with job.ws.writer("export", name) as w:
        target = w.path / "onnx"
        if precision in ("int4", "int8"):
            _fp32_graph(job, fp32)
            keep = None
            if precision == "int4":
                keep, info["calibration"] = _job_layout(job, scratch, plan)
                plan.write_beside(w.path)
            job.stages.emit("quantize", f"quantizing the ONNX graph to {precision}")
            details = onnx.quantize_onnx(fp32, target, precision, progress=job.report.log,
                                         keep_8bit=keep)
        elif precision == onnx.INT4_CUDA:  # genai's fp16 graph, with the layout measured on the fp32 one
            keep, info["calibration"] = _job_layout(job, scratch, plan)
            job.stages.emit("export-onnx", "building the int4-cuda ONNX graph")
            details = onnx.export_onnx(job.merged.path, target, precision, progress=job.report.log,
                                       keep_8bit_modules=None if keep is None else
                                       [onnx.unit_module(n) for n in keep])
            if keep is not None and details["quantization"]["layout"] == "fixed":  # could not be mapped
                info["calibration"] = {"used": False, "why": "the measured layout's modules are split "
                                       "otherwise in genai's graph: the fixed layout was used"}
            else:
                plan.write_beside(w.path)
        else:
            job.stages.emit("export-onnx", f"exporting the {precision} ONNX graph")
            details = onnx.export_onnx(job.merged.path, target, precision, progress=job.report.log)
        (w.path / "onnx_export.json").write_text(json.dumps(details, indent=2, default=str))
        job.stages.emit("load-runtime", f"loading {name} in onnxruntime")
        verdict = job.gate.check(job.merged, name, precision, onnx.OnnxLM(target))
        job.gate.commit(w, verdict, job.merged, {"format": "onnx", "precision": precision, "run": job.run},
                        {"format": "onnx", "type": precision, "run": job.run,
                         **({"calibrated": bool(info["calibration"].get("used"))} if info else {})},
                        info=info or None)
    return job.ws.get("export", name)


def _job_layout(job: _Export, scratch: Path, plan: layout.Layout) -> tuple[list[str] | None, dict[str, Any]]:
    """The 8-bit layout (MatMul names of the fp32 graph, None for the fixed one), measured once a job."""
    fp32 = scratch / "onnx-fp32"
    if plan.choice != layout.OFF and not plan.reuse(job.merged):
        _fp32_graph(job, fp32)  # the layout is measured against its MatMuls
    return plan.get(fp32, job.merged)


# -- each artifact, made or reused ---------------------------------------------------------------
def _reuse_or_refuse(report: Reporter, name: str, why: str | None, *, refuse: bool) -> None:
    """An export found made otherwise than asked (`why`): refused when the choice was explicit,
    else reused as it is, with a log line saying so."""
    if why and refuse:
        raise importance.refuse_mismatch(name, why)
    if why:
        report.log(f"{name} exists, {why}: reused as it is (remove it and export again for a new one)")



Same = Callable[[str, str, ArtifactRecord], None]  # (name, type, found): raises if it must not be reused


def _each(job: _Export, todo: dict[str, str], make: Callable[[str], ArtifactRecord],
          same: Same | None = None) -> list[ArtifactRecord]:
    """{artifact name: type} -> the artifacts, reusing those that exist, verify, were made from
    this merged model (and pass `same`); a failed one asked for again with thresholds is gated
    again."""
    out = []
    for name, kind in todo.items():
        job.stages.start(name)
        out.append(_one(job, name, kind, make, same))
        job.stages.finished(name)
    job.stages.done()
    return out


def _one(job: _Export, name: str, kind: str, make: Callable[[str], ArtifactRecord],
         same: Same | None) -> ArtifactRecord:
    """One artifact of `_each`: found and reused (or gated again), else made."""
    found = existing(job.ws, name)
    if found is not None:
        parents = manifest.read(found.path)["parents"]
        if not parents or parents[0]["manifest_sha256"] != job.merged.manifest_sha256:
            raise ApplianceError(f"{name} was made from an earlier {job.merged.name}",
                                 title="Stale export",
                                 hint=f"remove it (appliance exports rm {name}) and export again")
        if same is not None:
            same(name, kind, found)
        if found.status == "failed" and job.gate.overrides:
            job.report.log(f"{name} exists: gating it again with the given thresholds")
            job.gate.again(name)
            return job.ws.get("export", name)
        job.stages.reused(name)
        return found
    job.report.check_cancel()
    with disk_full_as_error(job.ws.kind_dir("export"), f"exporting {name}"):
        return make(kind)
