"""`appliance demo`: the pipeline on the embedded default model, stage by stage.

At this stage: import the embedded SmolLM2-135M-Instruct (GGUF -> HF folder for training, the GGUF
kept for inference) and the Dolly sample the repo ships, and say what was done and where. Later
stages (train, merge, export, parity, chat) are added here as they land. Re-running it reuses what
is already in the workspace after checking it against its manifest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from appliance import datasets, manifest, models, stack
from appliance.errors import NotFoundError
from appliance.workspace import ArtifactRecord, Workspace

DATASET_NAME = "dolly-sample"


def sample_dataset() -> Path:
    return Path(str(resources.files("appliance") / "data" / "dolly-sample" / "dolly_sample.jsonl"))


def _model(ws: Workspace, say: Callable[[str], None]) -> ArtifactRecord:
    try:
        record = ws.get("model", stack.DEFAULT_MODEL_NAME)
    except NotFoundError:
        say(f"[1/2] importing the embedded default model ({stack.DEFAULT_MODEL_FILE})")
        return models.import_default(ws, say=lambda m: say("      " + m))
    manifest.verify(record.path)
    say(f"[1/2] model {record.name!r} already imported; all files match their sha256")
    return record


def _dataset(ws: Workspace, model: ArtifactRecord, say: Callable[[str], None]) -> dict:
    try:
        record = ws.get("dataset", DATASET_NAME)
        manifest.verify(record.path)
        say(f"[2/2] dataset {DATASET_NAME!r} already imported; all files match their sha256")
        return json.loads((record.path / "report.json").read_text(encoding="utf-8"))
    except NotFoundError:
        say(f"[2/2] importing the Dolly sample (CC BY-SA 3.0) for {model.name!r}")
        _, report = datasets.import_file(ws, sample_dataset(), model, name=DATASET_NAME)
        return report


def run(ws: Workspace, say: Callable[[str], None]) -> int:
    from appliance.cli import human_count, print_dataset_report

    started = time.monotonic()
    say(f"appliance demo: workspace {ws.root}")
    model = _model(ws, say)
    s = model.summary
    say(f"      {s['architecture']}, {human_count(s['parameters'])} parameters, context "
        f"{s['context_length']}, {s['dtype']} -> {model.path}")
    report = _dataset(ws, model, say)
    print_dataset_report(report, limit=5)
    say(f"      -> {ws.artifact_dir('dataset', DATASET_NAME)}")
    say(f"done in {time.monotonic() - started:.1f} s. Next: `appliance models show "
        f"{model.name}`, `appliance data show {DATASET_NAME}`, `appliance doctor`.")
    return 0
