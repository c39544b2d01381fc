"""From a finished run to deployable artifacts, each checked by the parity gate.

Artifacts (kind `export`, under `exports/`), one per deployable thing:
- `<run>-merged`: the adapter merged into a full-precision base (HF folder), with `merge_check.json`
  (merged vs adapter-at-run-time logits) and `parity.json` (the adapter model as trained vs merged);
- `<run>-gguf-<type>`: one GGUF (F16, Q8_0, Q4_K_M, ...) with its Ollama `Modelfile`;
- `<run>-onnx-<precision>`: one ONNX folder (fp32, fp16, int8, int4), self-contained.
Every GGUF/ONNX artifact is scored against the merged model before it is committed; its
`parity.json` holds the verdict and a failing one is registered with status `failed`.

Each step is idempotent: an artifact that exists and still matches its manifest is reused.

Besides `say` (log lines), each public function takes `progress`: structured, staged progress
(`appliance.progress`: which artifact, which stage, counts only where they are really known), which
the job functions pass `JobContext.progress` for, so the CLI and the TUI can draw it.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import chat, manifest
from appliance.errors import ApplianceError, BusyError, ValidationError
from appliance.fsutil import atomic_write_text, disk_full_as_error
from appliance.progress import Progress, Stages
from appliance.stages.verify import parity
from appliance.workspace import ArtifactRecord, Workspace, parent_ref

if TYPE_CHECKING:
    import numpy as np

Say = Callable[[str], None]
PARITY_CONVERSATIONS = 16
PARITY_MAX_TOKENS = 512
GAP_PROMPTS = 4


def _quiet(_: str) -> None:
    pass


def tool_lines(say: Say) -> Say:
    """llama.cpp's converter and quantizer print a line per tensor, and the converter a progress
    bar many times a second (the staged progress counts it): keep the rest."""
    def inner(line: str) -> None:
        if ("-->" in line or "falling back to" in line or line.startswith(("llama_", "Writing:"))
                or re.match(r"\s*\[\s*\d+/\s*\d+\]", line)
                or (line.startswith("INFO:") and not re.search(r"architecture|successfully", line))):
            return
        say(line)
    return inner


def merged_name(run: str) -> str:
    return f"{run}-merged"


def artifact_name(run: str, fmt: str, kind: str) -> str:
    """An exported artifact's name: `<run>-gguf-q4_k_m`, `<run>-onnx-int4` (the job's result)."""
    return f"{run}-{fmt}-{kind.lower()}"


def _existing(ws: Workspace, name: str) -> ArtifactRecord | None:
    try:
        record = ws.get("export", name)
    except ApplianceError:
        return None
    manifest.verify(record.path)
    return record


# -- inputs --------------------------------------------------------------------------------------
def run_inputs(ws: Workspace, run: str, *, hash_model: bool = True
               ) -> tuple[ArtifactRecord, ArtifactRecord, ArtifactRecord]:
    """The run, its base model and its dataset, checked against their manifests (the model's
    weights by size only when `hash_model` is off: the gate reads its manifest, not its weights)."""
    try:
        record = ws.get("run", run)
    except ApplianceError:
        raise ApplianceError(f"no finished run named {run!r}", title="Not found",
                             hint="`appliance runs list` shows finished runs; a run that is still "
                                  "training or failed has no adapter to export yet") from None
    data = manifest.verify(record.path)
    parents = {p["kind"]: p for p in data["parents"]}
    found = []
    for kind in ("model", "dataset"):
        try:
            parent = ws.get(kind, parents[kind]["name"])
        except (KeyError, ApplianceError):
            raise ApplianceError(f"run {run!r} was trained on {kind} "
                                 f"{parents.get(kind, {}).get('name')!r}, which is no longer in the "
                                 "workspace", title=f"Missing base {kind}",
                                 hint=f"import it again under the same name (appliance {kind}s import)"
                                 ) from None
        manifest.verify(parent.path, full=hash_model or kind != "model")
        found.append(parent)
    return record, found[0], found[1]


def parity_data(model: ArtifactRecord, dataset: ArtifactRecord, tokenizer: Any
                ) -> tuple[list[parity.Sample], str]:
    """The held-out conversations to score (a fixed sample), and one rendered conversation for the
    tokenizer check."""
    from appliance.stages.datasets import importer as datasets

    info = manifest.read(model.path)["info"]
    rows = datasets.load_rows(dataset, "eval")
    if not rows:
        raise ApplianceError(f"dataset {dataset.name!r} has no held-out (eval) conversations to score",
                             title="Nothing to score",
                             hint="import the dataset again with an eval split (--eval-fraction)")
    conversations = [r["messages"] for r in rows]
    data = parity.samples(tokenizer, conversations, info["stop_tokens"], PARITY_MAX_TOKENS,
                          limit=PARITY_CONVERSATIONS)
    if not data:
        raise ApplianceError(f"none of the {len(rows)} held-out conversations of {dataset.name!r} has an "
                             f"assistant turn within its first {PARITY_MAX_TOKENS} tokens",
                             title="Nothing to score", hint="use a dataset with shorter prompts")
    text = chat.render(tokenizer, conversations[0])  # bounded, the same text as transformers'
    return data, text


class HFScorer:
    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForCausalLM

        from appliance.stages.merge.weights import scoring_dtype

        self.dtype = scoring_dtype(folder)
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=self.dtype,
                                                          trust_remote_code=False).eval()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


class AdapterScorer(HFScorer):
    """The model as trained: NF4 base (bitsandbytes) + the LoRA adapter through peft."""

    def __init__(self, base: Path, adapter: Path, train_config: dict[str, Any]) -> None:
        import torch
        from peft import PeftModel

        from appliance.stages.train.config import validate
        from appliance.stages.train.recipe import load_model, pick_device

        cfg = validate({k: v for k, v in train_config.items() if k != "devices"})
        _, dtype = pick_device(cfg)
        base_model = load_model(base, cfg, "cpu", dtype if dtype != torch.float16 else torch.float32)
        base_model = base_model.unload() if hasattr(base_model, "unload") else base_model
        self.model = PeftModel.from_pretrained(base_model, str(adapter)).eval()


class Checked:
    """A scorer that checks for a cancel request before each conversation it scores, so a cancel
    during a long parity run stops within one forward pass, and says when it has scored one."""

    def __init__(self, scorer: parity.Scorer, check_cancel: Callable[[], None],
                 scored: Callable[[], None] = lambda: None) -> None:
        self.scorer, self.check_cancel, self.scored = scorer, check_cancel, scored

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        self.check_cancel()
        out = self.scorer.logits(ids)
        self.scored()
        return out


def _scoring(stages: Stages, label: str, total: int) -> Callable[[], None]:
    """A `score` stage of `total` conversations, counted one call at a time."""
    count, done = stages.counter("score", label, "conversations", total), itertools.count(1)
    return lambda: count(next(done), total)


# -- merge ---------------------------------------------------------------------------------------
def merge(ws: Workspace, run: str, *, dtype: str | None = None, base: str | None = None,
          say: Say = _quiet, check_cancel: Callable[[], None] = lambda: None,
          progress: Progress | None = None) -> ArtifactRecord:
    """The `<run>-merged` artifact (made once; a later call finds and reuses it). dtype/base None:
    whatever an earlier merge used, else auto / full."""
    stages = Stages(progress, artifacts_total=1)
    record = _merge(ws, run, dtype=dtype, base=base, say=say, check_cancel=check_cancel,
                    stages=stages)
    stages.finished(record.name)
    stages.done()
    return record


def _merge(ws: Workspace, run: str, *, dtype: str | None, base: str | None, say: Say,
           check_cancel: Callable[[], None], stages: Stages) -> ArtifactRecord:
    from appliance.hfmodel import load_tokenizer
    from appliance.stages.merge import weights as merging

    name = merged_name(run)
    existing = _existing(ws, name)
    if existing is not None:
        made = manifest.read(existing.path)["config"]
        if dtype not in (None, made.get("dtype")) or base not in (None, made.get("base")):
            asked = " ".join(f"{k}={v}" for k, v in (("dtype", dtype), ("base", base)) if v)
            raise ApplianceError(f"{name} exists, merged with dtype={made.get('dtype')} "
                                 f"base={made.get('base')}, not {asked}",
                                 title="Already merged differently",
                                 hint=f"remove it first (appliance exports rm {name}) to merge again")
        say(f"{name} exists and matches its manifest: reused")
        stages.reused(name)
        return existing
    stages.start(name)
    dtype, base = dtype or "auto", base or "full"
    stages.emit("check-inputs", f"checking {run}, its base model and dataset against their manifests")
    record, model, dataset = run_inputs(ws, run)
    run_config = manifest.read(record.path)["config"]
    train_dtype = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(run_config.get("compute_dtype"),
                                                                          "fp32")
    with ws.writer("export", name) as w, disk_full_as_error(ws.kind_dir("export"), f"merging {run}"):
        say(f"merging {run} into {model.name} ({base} base, {dtype})")
        summary = merging.merge_folder(model.path, record.path / "adapter", w.path, dtype=dtype,
                                       base=base, train_dtype=train_dtype, say=say,
                                       check_cancel=check_cancel, counts=stages.counter(
                                           "merge", f"merging into {model.name}", "tensors"))
        tokenizer = load_tokenizer(w.path)
        data, _ = parity_data(model, dataset, tokenizer)
        prompts = [s.input_ids[:128] for s in data[:GAP_PROMPTS]]
        check_cancel()
        say("checking merged vs adapter logits")
        stages.emit("check-merge", "checking merged vs adapter logits")
        gap = merging.logits_gap(w.path, model.path, record.path / "adapter", prompts, base=base,
                                 train_dtype=train_dtype)
        (w.path / "merge_check.json").write_text(json.dumps({**summary, **gap}, indent=2))
        say("scoring the adapter model (as trained) against the merged model")
        stages.emit("load-adapter", "loading the adapter model as trained (its base as in training + LoRA)")
        adapter = AdapterScorer(model.path, record.path / "adapter", run_config.get("train", {}))
        report = _parity_report(w.path, data, {"adapter": ("adapter", adapter)}, None, {}, say,
                                reference_name=name, gating=False, check_cancel=check_cancel,
                                stages=stages)
        (w.path / "parity.json").write_text(json.dumps(report, indent=2))
        stages.emit("record", f"recording {name} (hashing its files into the manifest)")
        w.commit(parents=[parent_ref(record), parent_ref(model)],
                 config={"dtype": dtype, "base": base, "run": run},
                 info={"format": "hf", "summary": {"format": "merged", "run": run, "base": base,
                                                   "type": f"{summary['dtype']}, {base} base",
                                                   "parity": "reference"}},
                 metrics={"merge_gap": gap, "adapter_parity": report["artifacts"][0]})
    return ws.get("export", name)


# -- parity --------------------------------------------------------------------------------------
def _parity_report(reference_dir: Path, data: list[parity.Sample],
                   artifacts: dict[str, tuple[str, parity.Scorer]], token_check: dict[str, bool] | None,
                   overrides: dict[str, float], say: Say, *, reference_name: str = "",
                   gating: bool = True, check_cancel: Callable[[], None] = lambda: None,
                   stages: Stages) -> dict[str, Any]:
    rows, dtype = _reference_rows(reference_dir, data, say, check_cancel, stages, keep=gating)
    ref = parity.Score()
    for s, r in zip(data, rows, strict=True):
        ref.add(r, r, s.targets)
    results = []
    for name, (kind, scorer) in artifacts.items():
        say(f"scoring {name}")
        scored = _scoring(stages, f"scoring {kind}", len(data))
        score = parity.score(Checked(scorer, check_cancel, scored), data, rows)
        result = parity.judge(name, kind, score, ref, (token_check or {}).get(name), overrides)
        if not gating:  # reported, not judged: e.g. the adapter model as trained vs the merged one
            result.passed, result.reasons = None, ["informational"]
        results.append(result)
    return {"reference": {"name": reference_name or reference_dir.name,
                          "perplexity": round(ref.perplexity, 4),
                          "dtype": dtype},
            "conversations": len(data), "tokens": ref.count,
            "artifacts": [r.__dict__ for r in results],
            "passed": all(r.passed is not False for r in results)}


# The reference's logits for the artifacts of one export job: the merged model is scored once,
# not once per artifact. One entry, dropped when the job's artifacts are done (`_each`, `verify`).
_REFERENCE_ROWS: dict[tuple[str, str], tuple[list[Any], str]] = {}


def _reference_rows(reference_dir: Path, data: list[parity.Sample], say: Say,
                    check_cancel: Callable[[], None], stages: Stages, *, keep: bool
                    ) -> tuple[list[Any], str]:
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for sample in data:
        digest.update(np.asarray(sample.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(sample.positions, dtype=np.int64).tobytes())
    key = (str(reference_dir), digest.hexdigest())
    if key in _REFERENCE_ROWS:
        say("reference: scored earlier in this job, reused")
        return _REFERENCE_ROWS[key]
    stages.emit("load-reference", f"loading the reference {reference_dir.name} (merged) to score against")
    reference = HFScorer(reference_dir)
    scored = _scoring(stages, "scoring the reference (merged)", len(data))
    rows = parity.reference_rows(Checked(reference, check_cancel, scored), data)
    say(f"reference scored: {len(data)} held-out conversations")
    found = rows, str(reference.dtype).removeprefix("torch.")
    _REFERENCE_ROWS.clear()
    if keep:
        _REFERENCE_ROWS[key] = found
    return found


def _gate(ws: Workspace, merged: ArtifactRecord, artifact_name: str, kind: str, scorer: Any,
          runtime_ids: Callable[[str], list[int]], overrides: dict[str, float], say: Say,
          check_cancel: Callable[[], None], stages: Stages) -> dict[str, Any]:
    from appliance.hfmodel import load_tokenizer

    run = manifest.read(merged.path)["config"]["run"]
    _, model, dataset = run_inputs(ws, run, hash_model=False)  # hashed when the merge was made
    tokenizer = load_tokenizer(merged.path)
    data, text = parity_data(model, dataset, tokenizer)
    same = runtime_ids(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    return _parity_report(merged.path, data, {artifact_name: (kind, scorer)}, {artifact_name: same},
                          overrides, say, reference_name=merged.name, check_cancel=check_cancel,
                          stages=stages)


def _commit_gated(w: Any, report: dict[str, Any], merged: ArtifactRecord, config: dict[str, Any],
                  summary: dict[str, Any], say: Say, stages: Stages) -> None:
    (w.path / "parity.json").write_text(json.dumps(report, indent=2))
    passed = report["passed"]
    say(parity.table(report))
    stages.emit("record", f"recording {w.name} (hashing its files into the manifest)")
    w.commit(parents=[parent_ref(merged)], config=config, status="ready" if passed else "failed",
             info={"summary": {**summary, "parity": "pass" if passed else "FAIL"}},
             metrics={"parity": report["artifacts"][0]})


# -- GGUF ----------------------------------------------------------------------------------------
def export_gguf(ws: Workspace, run: str, quants: list[str], *, scratch: Path,
                overrides: dict[str, float] | None = None, say: Say = _quiet,
                check_cancel: Callable[[], None] = lambda: None,
                progress: Progress | None = None) -> list[ArtifactRecord]:
    from export import gguf

    names = [gguf.resolve_quant_type(q)[0] for q in quants]  # unknown types fail before any work
    todo = {artifact_name(run, "gguf", q): q for q in names}
    stages = Stages(progress, artifacts_total=len(todo))
    merged = _merge(ws, run, dtype=None, base=None, say=say, check_cancel=check_cancel,
                    stages=stages)
    base = scratch / f"{run}-F16.gguf"

    def make(qtype: str) -> ArtifactRecord:
        if not base.exists():  # converted once, for every type of this job
            scratch.mkdir(parents=True, exist_ok=True)
            gguf.convert(merged.path, base, progress=tool_lines(say),
                         counts=stages.counter("convert", "converting to GGUF F16", "%"))
        return _one_gguf(ws, merged, run, qtype, base, overrides or {}, say, check_cancel, stages)

    return _each(ws, merged, todo, make, say, check_cancel, overrides, stages)


def _each(ws: Workspace, merged: ArtifactRecord, todo: dict[str, str],
          make: Callable[[str], ArtifactRecord], say: Say, check_cancel: Callable[[], None],
          overrides: dict[str, float] | None, stages: Stages) -> list[ArtifactRecord]:
    """{artifact name: type} -> the artifacts, reusing those that exist, verify and were made from
    this merged model; a failed one asked for again with thresholds is gated again."""
    out = []
    try:
        for name, kind in todo.items():
            stages.start(name)
            out.append(_one(ws, merged, name, kind, make, say, check_cancel, overrides, stages))
            stages.finished(name)
    finally:
        _REFERENCE_ROWS.clear()
    stages.done()
    return out


def _one(ws: Workspace, merged: ArtifactRecord, name: str, kind: str,
         make: Callable[[str], ArtifactRecord], say: Say, check_cancel: Callable[[], None],
         overrides: dict[str, float] | None, stages: Stages) -> ArtifactRecord:
    """One artifact of `_each`: found and reused (or gated again), else made."""
    existing = _existing(ws, name)
    if existing is not None:
        parents = manifest.read(existing.path)["parents"]
        if not parents or parents[0]["manifest_sha256"] != merged.manifest_sha256:
            raise ApplianceError(f"{name} was made from an earlier {merged.name}",
                                 title="Stale export",
                                 hint=f"remove it (appliance exports rm {name}) and export again")
        if existing.status == "failed" and overrides:
            say(f"{name} exists: gating it again with the given thresholds")
            _verify(ws, name, overrides, say, check_cancel, stages)
            return ws.get("export", name)
        say(f"{name} exists and matches its manifest: reused")
        stages.reused(name)
        return existing
    check_cancel()
    with disk_full_as_error(ws.kind_dir("export"), f"exporting {name}"):
        return make(kind)


def _one_gguf(ws: Workspace, merged: ArtifactRecord, run: str, qtype: str, base: Path,
              overrides: dict[str, float], say: Say, check_cancel: Callable[[], None],
              stages: Stages) -> ArtifactRecord:
    from export import gguf, ollama

    name = artifact_name(run, "gguf", qtype)
    with ws.writer("export", name) as w:
        path = w.path / f"{run}-{qtype}.gguf"
        if qtype == "F16":
            shutil.copy2(base, path)
        else:
            gguf.quantize(base, path, qtype, progress=tool_lines(say),
                          counts=stages.counter("quantize", f"quantizing to {qtype}", "tensors"))
        say(f"checking {path.name}")
        stages.emit("check", f"checking {path.name}")
        check = gguf.check_gguf(path, merged.path)
        ollama.write_modelfile(path, merged.path, out=w.path / "Modelfile")
        (w.path / "gguf_check.json").write_text(json.dumps(check, indent=2, default=str))
        stages.emit("load-runtime", f"loading {path.name} in llama.cpp")
        with gguf.GgufLM(path, n_ctx=PARITY_MAX_TOKENS + 16) as lm:
            report = _gate(ws, merged, name, qtype.lower(), lm, lm.tokenize, overrides, say, check_cancel,
                           stages)
        _commit_gated(w, report, merged, {"format": "gguf", "type": qtype, "run": run},
                      {"format": "gguf", "type": qtype, "run": run, "file": path.name}, say, stages)
    return ws.get("export", name)


# -- ONNX ----------------------------------------------------------------------------------------
def export_onnx(ws: Workspace, run: str, precisions: list[str], *, scratch: Path,
                overrides: dict[str, float] | None = None, say: Say = _quiet,
                check_cancel: Callable[[], None] = lambda: None,
                progress: Progress | None = None) -> list[ArtifactRecord]:
    from export import onnx

    bad = [p for p in precisions if p not in onnx.PRECISIONS]
    if bad:
        raise ValidationError(f"unknown ONNX precision {bad[0]!r}; valid: {', '.join(onnx.PRECISIONS)}")
    todo = {artifact_name(run, "onnx", p): p for p in precisions}
    stages = Stages(progress, artifacts_total=len(todo))
    merged = _merge(ws, run, dtype=None, base=None, say=say, check_cancel=check_cancel,
                    stages=stages)
    return _each(ws, merged, todo,
                 lambda p: _one_onnx(ws, merged, run, p, scratch, overrides or {}, say, check_cancel,
                                     stages), say, check_cancel, overrides, stages)


def _one_onnx(ws: Workspace, merged: ArtifactRecord, run: str, precision: str, scratch: Path,
              overrides: dict[str, float], say: Say, check_cancel: Callable[[], None],
              stages: Stages) -> ArtifactRecord:
    from export import onnx

    name = artifact_name(run, "onnx", precision)
    fp32 = scratch / "onnx-fp32"
    with ws.writer("export", name) as w:
        target = w.path / "onnx"
        if precision in ("int4", "int8"):
            if not (fp32 / onnx.MODEL_FILE).exists():  # exported once, for every type of this job
                shutil.rmtree(fp32, ignore_errors=True)
                stages.emit("export-onnx", "exporting the fp32 ONNX graph")
                onnx.export_onnx(merged.path, fp32, "fp32", progress=say)
            stages.emit("quantize", f"quantizing the ONNX graph to {precision}")
            details = onnx.quantize_onnx(fp32, target, precision, progress=say)
        else:
            stages.emit("export-onnx", f"exporting the {precision} ONNX graph")
            details = onnx.export_onnx(merged.path, target, precision, progress=say)
        (w.path / "onnx_export.json").write_text(json.dumps(details, indent=2, default=str))
        stages.emit("load-runtime", f"loading {name} in onnxruntime")
        lm = onnx.OnnxLM(target)
        report = _gate(ws, merged, name, precision, lm, lm.tokenize, overrides, say, check_cancel,
                       stages)
        _commit_gated(w, report, merged, {"format": "onnx", "precision": precision, "run": run},
                      {"format": "onnx", "type": precision, "run": run}, say, stages)
    return ws.get("export", name)


# -- verify again, and the gate for consumers ----------------------------------------------------
def verify(ws: Workspace, name: str, *, overrides: dict[str, float] | None = None, say: Say = _quiet,
           check_cancel: Callable[[], None] = lambda: None,
           progress: Progress | None = None) -> dict[str, Any]:
    """Re-run the parity gate of an existing export and update its parity.json, status and manifest."""
    stages = Stages(progress, artifacts_total=1)
    stages.start(name)
    try:
        report = _verify(ws, name, overrides or {}, say, check_cancel, stages)
    finally:
        _REFERENCE_ROWS.clear()
    stages.finished(name)
    stages.done()
    return report


def _verify(ws: Workspace, name: str, overrides: dict[str, float], say: Say,
            check_cancel: Callable[[], None], stages: Stages) -> dict[str, Any]:
    from export import gguf, onnx

    record = ws.get("export", name)
    stages.emit("check-files", f"checking {name}'s files against its manifest")
    data = manifest.verify(record.path)
    config = data["config"]
    if config.get("format") not in ("gguf", "onnx"):
        raise ValidationError(f"{name} is a merged model: it is the reference, not something to verify",
                              hint="verify one of its GGUF or ONNX exports")
    merged = ws.get("export", merged_name(config["run"]))
    if config["format"] == "gguf":
        path = record.path / f"{config['run']}-{config['type']}.gguf"
        stages.emit("load-runtime", f"loading {path.name} in llama.cpp")
        with gguf.GgufLM(path, n_ctx=PARITY_MAX_TOKENS + 16) as lm:
            report = _gate(ws, merged, name, config["type"].lower(), lm, lm.tokenize, overrides, say,
                           check_cancel, stages)
    else:
        stages.emit("load-runtime", f"loading {name} in onnxruntime")
        onnx_lm = onnx.OnnxLM(record.path / "onnx")
        report = _gate(ws, merged, name, config["precision"], onnx_lm, onnx_lm.tokenize, overrides, say,
                       check_cancel, stages)
    _rewrite_parity(ws, record, data, report)
    return report


def _rewrite_parity(ws: Workspace, record: ArtifactRecord, data: dict[str, Any], report: dict[str, Any]
                    ) -> None:
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
        atomic_write_text(target, json.dumps(report, indent=2))
        data["files"]["parity.json"] = {"size": target.stat().st_size, "sha256": sha256_file(target)}
        data["status"] = "ready" if report["passed"] else "failed"
        data["info"].setdefault("summary", {})["parity"] = "pass" if report["passed"] else "FAIL"
        data["metrics"]["parity"] = report["artifacts"][0]
        w.commit_manifest(data)
    ws.audit("verify", kind="export", name=record.name, passed=report["passed"])
