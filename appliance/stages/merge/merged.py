"""The `<run>-merged` artifact: a run's adapter merged into a full-precision base (an HF folder,
kind `export`), with `merge_check.json` (merged vs adapter-at-run-time logits, `weights.logits_gap`)
and `parity.json` (the adapter model as trained vs the merged one, informational: scored by the
verify stage's `scoring`, not gated). Made once: a later call finds and reuses it.

`merge` is the merge job's; the export stage calls `merged_model` inside its own stages (the merged
model is every export's source, and the parity gate's reference).
"""

from __future__ import annotations

import json

from appliance import licences, manifest
from appliance.errors import ApplianceError
from appliance.fsutil import disk_full_as_error
from appliance.progress import QUIET, Reporter, Stages
from appliance.stages.merge.inputs import existing, merged_name, run_inputs
from appliance.stages.verify.scoring import AdapterScorer, Candidate, ReferenceMemo, Scoring, parity_data
from appliance.workspace import ArtifactRecord, Workspace, parent_ref

GAP_PROMPTS = 4


def merge(ws: Workspace, run: str, *, dtype: str | None = None, base: str | None = None,
          report: Reporter = QUIET) -> ArtifactRecord:
    """The `<run>-merged` artifact (made once; a later call finds and reuses it). dtype/base None:
    whatever an earlier merge used, else auto / full."""
    stages = Stages(report.progress, artifacts_total=1)
    record = merged_model(ws, run, stages, report, dtype=dtype, base=base)
    stages.finished(record.name)
    stages.done()
    return record


def merged_model(ws: Workspace, run: str, stages: Stages, report: Reporter = QUIET, *,
                 dtype: str | None = None, base: str | None = None,
                 memo: ReferenceMemo | None = None) -> ArtifactRecord:
    """`merge` reporting into the caller's `stages` (an export's: the merged model is not one of
    its counted artifacts). `memo` gets the merged model's logits on the held-out conversations,
    which the adapter check scores: the export's gate, in the same job, scores against them."""
    from appliance.hfmodel import load_tokenizer
    from appliance.stages.merge import weights as merging

    name = merged_name(run)
    found = existing(ws, name)
    if found is not None:
        made = manifest.read(found.path)["config"]
        if dtype not in (None, made.get("dtype")) or base not in (None, made.get("base")):
            asked = " ".join(f"{k}={v}" for k, v in (("dtype", dtype), ("base", base)) if v)
            raise ApplianceError(f"{name} exists, merged with dtype={made.get('dtype')} "
                                 f"base={made.get('base')}, not {asked}",
                                 title="Already merged differently",
                                 hint=f"remove it first (appliance exports rm {name}) to merge again")
        stages.reused(name)
        return found
    stages.start(name)
    dtype, base = dtype or "auto", base or "full"
    stages.emit("check-inputs", f"checking {run}, its base model and dataset against their manifests")
    record, model, dataset = run_inputs(ws, run)
    run_config = manifest.read(record.path)["config"]
    train_dtype = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(run_config.get("compute_dtype"),
                                                                          "fp32")
    with ws.writer("export", name) as w, disk_full_as_error(ws.kind_dir("export"), f"merging {run}"):
        report.log(f"merging {run} into {model.name} ({base} base, {dtype})")
        summary = merging.merge_folder(model.path, record.path / "adapter", w.path, dtype=dtype,
                                       base=base, train_dtype=train_dtype, report=report,
                                       counts=stages.counter("merge", f"merging into {model.name}",
                                                             "tensors"))
        tokenizer = load_tokenizer(w.path)
        data, _ = parity_data(model, dataset, tokenizer)
        prompts = [s.input_ids[:128] for s in data[:GAP_PROMPTS]]
        report.check_cancel()
        report.log("checking merged vs adapter logits")
        stages.emit("check-merge", "checking merged vs adapter logits")
        gap = merging.logits_gap(w.path, model.path, record.path / "adapter", prompts, base=base,
                                 train_dtype=train_dtype)
        (w.path / "merge_check.json").write_text(json.dumps({**summary, **gap}, indent=2))
        report.log("scoring the adapter model (as trained) against the merged model")
        stages.emit("load-adapter", "loading the adapter model as trained (its base as in training + LoRA)")
        adapter = AdapterScorer(model.path, record.path / "adapter", run_config.get("train", {}))
        verdict = Scoring(stages, report, gating=False, memo=memo).parity_report(
            w.path, name, data, {"adapter": Candidate("adapter", adapter)})
        (w.path / "parity.json").write_text(json.dumps(verdict, indent=2))
        stages.emit("record", f"recording {name} (hashing its files into the manifest)")
        w.commit(parents=[parent_ref(record), parent_ref(model)],
                 config={"dtype": dtype, "base": base, "run": run},
                 info={"format": "hf",
                       "licenses": licences.carry(ws, [parent_ref(record), parent_ref(model)], w.path),
                       "summary": {"format": "merged", "run": run, "base": base,
                                                   "type": f"{summary['dtype']}, {base} base",
                                                   "parity": "reference"}},
                 metrics={"merge_gap": gap, "adapter_parity": verdict["artifacts"][0]})
    return ws.get("export", name)
