"""`appliance demo`: the pipeline on the embedded default model, stage by stage.

At this stage: import the embedded SmolLM2-135M-Instruct (GGUF -> HF folder for training, the GGUF
kept for inference) and the Dolly sample the repo ships, then a short QLoRA run on the CPU as a
detached job (its progress followed here; Ctrl-C leaves it running), and eval perplexity before and
after; then the adapter merged into the base, exported to GGUF (Q8_0, Q4_K_M) and ONNX (int4) in
one job, each export scored by the parity gate against the merged model, and the parity table; last, a short
scripted chat with the fine-tuned Q8_0 model through the runtime's engine (the same one `appliance
chat` and `appliance serve` use); then a before/after evaluation (the base model and the Q8_0
GGUF that will be served answering a few held-out items, scored against the references), and the
commands to serve it. Re-running it reuses
what is already in the workspace after checking it against its manifest, and picks up a training
job that an earlier demo left running or interrupted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from appliance import api, jobs, manifest, stack
from appliance.errors import JobFailedError, NotFoundError
from appliance.stages.datasets import importer as datasets
from appliance.stages.export import DEFAULT_TYPES, ExportRequest
from appliance.stages.export.request import PLAN
from appliance.stages.models import importer as models
from appliance.stages.train.request import DEFAULT_RECIPE, TrainRequest
from appliance.workspace import ArtifactRecord, Workspace

DATASET_NAME = "dolly-sample"
RUN_NAME = "demo-qlora"
RECIPE = DEFAULT_RECIPE
STAGES = 6
CHAT_MODEL = f"{RUN_NAME}-gguf-q8_0"
EVAL_NAME = "demo-eval"
EVAL_ITEMS, EVAL_MAX_NEW_TOKENS = 4, 48  # a glimpse, kept short: `appliance eval` does all 16
CHAT = ("Give me three tips for writing a clear email.", "Write a subject line for a meeting request.")
# the default types of both formats, in one export job (format plan): the merged model is scored
# once for the merge's check and every gate
EXPORTS = {fmt: tuple(DEFAULT_TYPES[fmt]) for fmt in ("gguf", "onnx")}


SAMPLE_ATTRIBUTION = ("databricks-dolly-15k by Databricks, Inc., CC BY-SA 3.0; an unmodified subset "
                      "(ATTRIBUTION.md)")


def sample_dataset() -> Path:
    return Path(str(resources.files("appliance") / "data" / "dolly-sample" / "dolly_sample.jsonl"))


def _existing(ws: Workspace, kind: str, name: str, stage: int, done: str,
              say: Callable[[str], None]) -> ArtifactRecord | None:
    """An artifact an earlier demo made, checked against every sha256; None if there is none."""
    try:
        record = ws.get(kind, name)
    except NotFoundError:
        return None
    manifest.verify(record.path)
    say(f"[{stage}/{STAGES}] {kind} {name!r} already {done}; all files match their sha256")
    return record


def _model(ws: Workspace, say: Callable[[str], None]) -> ArtifactRecord:
    record = _existing(ws, "model", stack.DEFAULT_MODEL_NAME, 1, "imported", say)
    if record is not None:
        return record
    say(f"[1/{STAGES}] importing the embedded default model ({stack.DEFAULT_MODEL_FILE})")
    return models.import_default(ws, say=lambda m: say("      " + m))


def _dataset(ws: Workspace, model: ArtifactRecord, say: Callable[[str], None]) -> dict:
    record = _existing(ws, "dataset", DATASET_NAME, 2, "imported", say)
    if record is not None:
        return json.loads((record.path / "report.json").read_text(encoding="utf-8"))
    say(f"[2/{STAGES}] importing the Dolly sample (CC BY-SA 3.0) for {model.name!r}")
    _, report = datasets.import_file(ws, sample_dataset(), model, name=DATASET_NAME,
                                     attribution=SAMPLE_ATTRIBUTION)
    return report


def _demo_job(ws: Workspace) -> jobs.Job | None:
    """A training job of an earlier demo that has not produced the run yet."""
    for job in jobs.list_jobs(ws):
        if job.kind == "train" and job.params.get("name") == RUN_NAME and job.state != "succeeded":
            return job
    return None


def _train(ws: Workspace, model: ArtifactRecord, say: Callable[[str], None]) -> ArtifactRecord:
    from appliance.textout import EventPrinter

    record = _existing(ws, "run", RUN_NAME, 3, "trained", say)
    if record is not None:
        return record
    job = _demo_job(ws)
    if job is not None and job.state in jobs.RESUMABLE:
        say(f"[3/{STAGES}] resuming the demo's training job {job.id} ({job.state})")
        job = jobs.resume(ws, job.id)
    elif job is None:
        request = TrainRequest.from_recipe(model.name, DATASET_NAME, RECIPE, name=RUN_NAME)
        values = request.config
        say(f"[3/{STAGES}] QLoRA on the CPU: recipe {RECIPE} (NF4 base, LoRA r={values['lora_r']}, "
            f"{values['max_steps']} steps of {values['batch_size']} conversations)")
        job = api.start_request(ws, request)
    say(f"      job {job.id} runs detached; Ctrl-C here leaves it running "
        f"(appliance jobs logs {job.id} --follow)")
    show = EventPrinter(indent="      ")
    for event in jobs.follow(ws, job.id):
        if event["type"] in ("progress", "eval", "log", "state"):
            show(event)
    finished = jobs.get(ws, job.id)
    if finished.state != "succeeded":
        raise JobFailedError(f"the demo's training job ended {finished.state}: {finished.message}",
                             title="Training did not finish",
                             hint=f"see `appliance jobs logs {job.id}`; `appliance jobs resume "
                                  f"{job.id}` continues it")
    return ws.get("run", RUN_NAME)


def _follow_job(ws: Workspace, kind: str, params: dict, say: Callable[[str], None]) -> None:
    from appliance.textout import EventPrinter

    job = api.start(ws, kind, params)
    say(f"      job {job.id} runs detached (appliance jobs logs {job.id} --follow)")
    show = EventPrinter(indent="      ")
    for event in jobs.follow(ws, job.id):
        if event["type"] in ("log", "state"):
            show(event)
    finished = jobs.get(ws, job.id)
    if finished.state != "succeeded":
        raise JobFailedError(f"the demo's {kind} job ended {finished.state}: {finished.message}",
                             title=f"{kind.capitalize()} did not finish",
                             hint=f"see `appliance jobs logs {job.id}`")


def _exports(ws: Workspace, say: Callable[[str], None]) -> list[ArtifactRecord]:
    names = [f"{RUN_NAME}-{fmt}-{t.lower()}" for fmt, types in EXPORTS.items() for t in types]
    if all(ws.artifact_dir("export", n).exists() for n in names):
        for n in names:
            manifest.verify(ws.get("export", n).path)
        say(f"[4/{STAGES}] {', '.join(names)} already exported; all files match their sha256")
    else:
        listed = "; ".join(f"{fmt.upper()} {', '.join(types)}" for fmt, types in EXPORTS.items())
        say(f"[4/{STAGES}] merge + export ({listed}), each parity-checked")
        request = ExportRequest(RUN_NAME, PLAN, tuple(t for types in EXPORTS.values() for t in types))
        _follow_job(ws, request.kind, request.to_params(), say)
    return [ws.get("export", n) for n in names]


def _parity_table(records: list[ArtifactRecord]) -> str:
    from appliance.stages.verify import parity

    reports = [json.loads((r.path / "parity.json").read_text()) for r in records]
    merged = {**reports[0], "artifacts": [a for rep in reports for a in rep["artifacts"]]}
    return parity.table(merged)


def _chat(ws: Workspace, say: Callable[[str], None]) -> None:
    """Two turns with the fine-tuned model, greedy, streamed to the terminal as they are generated."""
    from appliance.runtime import engines

    say(f"[5/{STAGES}] chat with the fine-tuned model ({CHAT_MODEL}, greedy)")
    artifact = engines.resolve(CHAT_MODEL, ws, allow_failed_parity=True)  # the table above says
    engine = engines.open_engine(artifact, context_length=2048)
    messages: list[dict[str, str]] = []
    try:
        for question in CHAT:
            messages.append({"role": "user", "content": question})
            print(f"      user> {question}\n      assistant> ", end="", flush=True)
            parts = []
            for item in engine.generate(messages, engines.Sampling(temperature=0, max_tokens=160)):
                if isinstance(item, engines.Delta) and item.text:
                    parts.append(item.text)
                    print(item.text.replace("\n", "\n      "), end="", flush=True)
            assert isinstance(item, engines.Done)  # a generation always ends with its Done
            print(f"\n      ({item.completion_tokens} tokens, {item.reason})", flush=True)
            messages.append({"role": "assistant", "content": "".join(parts)})
    finally:
        engine.close()


def _eval(ws: Workspace, model: ArtifactRecord, say: Callable[[str], None]) -> None:
    """Before/after on a few held-out items: the base and the Q8_0 GGUF that is served (the job
    logs the table; an earlier demo's eval is shown again). The run itself is left out: as trained
    it answers on the NF4 base, whose own loss on a 135M model would read as the fine-tune's
    (`appliance eval demo-qlora` shows it)."""
    from appliance.stages.eval import results
    from appliance.stages.eval.request import EvalRequest

    record = _existing(ws, "eval", EVAL_NAME, 6, "evaluated", say)
    if record is None:
        say(f"[6/{STAGES}] before/after: {model.name} and {CHAT_MODEL} answer "
            f"{EVAL_ITEMS} held-out items (greedy, at most {EVAL_MAX_NEW_TOKENS} tokens)")
        request = EvalRequest((model.name, CHAT_MODEL), limit=EVAL_ITEMS,
                              max_new_tokens=EVAL_MAX_NEW_TOKENS, name=EVAL_NAME)
        _follow_job(ws, request.kind, request.to_params(), say)
        record = ws.get("eval", EVAL_NAME)
    else:
        say(results.table(json.loads((record.path / "eval.json").read_text(encoding="utf-8"))))
    say(f"      report: {record.path / 'report.md'}")


def _serve_hint(ws: Workspace) -> str:
    home = f" --home {ws.root}"
    return (f"Serve it: `appliance{home} keys create me` (prints a key), then `appliance{home} serve "
            f"{CHAT_MODEL}` (OpenAI-compatible API on http://127.0.0.1:8321/v1); chat in the "
            f"terminal: `appliance{home} chat {CHAT_MODEL}`.")


def run(ws: Workspace, say: Callable[[str], None]) -> int:
    from appliance.textout import human_count, print_dataset_report

    started = time.monotonic()
    say(f"appliance demo: workspace {ws.root}")
    model = _model(ws, say)
    s = model.summary
    say(f"      {s['architecture']}, {human_count(s['parameters'])} parameters, context "
        f"{s['context_length']}, {s['dtype']} -> {model.path}")
    report = _dataset(ws, model, say)
    print_dataset_report(report, limit=5)
    say(f"      -> {ws.artifact_dir('dataset', DATASET_NAME)}")
    run_record = _train(ws, model, say)
    metrics = manifest.read(run_record.path)["metrics"]
    say(f"      eval perplexity {metrics['perplexity_before']:.3f} before -> "
        f"{metrics['perplexity_after']:.3f} after ({metrics['steps']} steps); adapter at "
        f"{run_record.path / 'adapter'}")
    exported = _exports(ws, say)
    say(_parity_table(exported))
    from appliance.runtime import engines

    for record in exported:  # what the runtime loads (a Q4_K_M folder also holds its imatrix.gguf)
        served = engines.resolve(record.name, ws, allow_failed_parity=True).path
        say(f"      {record.name}: {record.status} -> {served}")
    _chat(ws, say)
    _eval(ws, model, say)
    say(_serve_hint(ws))
    say(f"done in {time.monotonic() - started:.1f} s. Next: `appliance exports list`, `appliance "
        f"exports show {exported[-1].name}`, `appliance jobs list`.")
    return 0
