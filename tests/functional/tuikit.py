"""Helpers for the TUI tests: waiting on a running app, a workspace of fixed content for snapshots,
and the SVG snapshot comparison.

The fixed workspace is real (written through `ArtifactWriter`, indexed in SQLite, jobs in the jobs
table) but its content is constant: a model folder made of SmolLM2's real tokenizer and a config
(no weights: the screens read manifests, the preview needs only the tokenizer), a dataset imported
for real from a fixed file, exports with fixed parity reports, and job rows and event files with
fixed ids, times and numbers. Nothing on screen depends on the clock, the machine or the path.

Snapshots are SVG (Textual's own `export_screenshot`) compared byte for byte with the files in
`tests/functional/snapshots/`; `UPDATE_SNAPSHOTS=1` rewrites them. A mismatch leaves the new SVG
and a plain-text rendering of both next to the test's tmp dir to compare.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import DirectoryTree

from appliance import jobs, stack
from appliance.stages.datasets import importer as datasets
from appliance.workspace import Workspace, parent_ref
from tui.app import ApplianceApp, Settings
from tui.system import GpuStatus, SystemStatus

HERE = Path(__file__).parent
SNAPSHOTS = HERE / "snapshots"
TOKENIZER_DIR = HERE.parent / "fixtures" / "smollm2-tokenizer"
MODEL = "smollm2-135m-instruct"
DATASET = "support-chats"
RUN = "support-run"
TRAIN_JOB = "20261122-103000-train-d4e5f6"
FIXED_STATUS = SystemStatus(
    cpu_percent=23.0, cpu_count=16, ram_used_gib=31.2, ram_total_gib=125.7, disk_free_gib=120.3,
    disk_total_gib=500.0, offline_guard=True, offline_env=True,
    gpus=(GpuStatus(0, "NVIDIA H100 80GB HBM3", 1228.0, 81559.0, 12.0, "9.0"),))


def fixed_probe(_: Workspace) -> SystemStatus:
    return FIXED_STATUS


def no_gpu_probe(_: Workspace) -> SystemStatus:
    return SystemStatus(cpu_percent=50.0, cpu_count=2, ram_used_gib=3.1, ram_total_gib=7.7,
                        disk_free_gib=40.0, disk_total_gib=100.0, offline_guard=True,
                        offline_env=True, gpu_note="no GPU (nvidia-smi not found): training runs "
                                                   "on the CPU")


def app_for(ws: Workspace, *, probe: Callable[[Workspace], SystemStatus] = fixed_probe,
            poll_s: float = 0.0, browse_from: Path | None = None,
            server_metrics: Callable[[str], Any] | None = None,
            clock: Callable[[], float] = time.time, profile: str = "full") -> ApplianceApp:
    """The app on `ws` with fixed system numbers, no polling unless asked, no settings file, the
    full profile unless asked."""
    return ApplianceApp(ws, Settings(poll_s=poll_s, workspace_label="/srv/appliance",
                                     browse_from=browse_from, probe=probe, server_probe=None,
                                     server_metrics=server_metrics, clock=clock, profile=profile))


def gguf_export(ws: Workspace, name: str, status: str = "ready") -> None:
    """A real, servable export: the embedded SmolLM2 GGUF registered under `name`."""
    gguf = stack.default_model_path()
    with ws.writer("export", name) as w:
        shutil.copy2(gguf, w.path / gguf.name)
        verdict = "pass" if status == "ready" else "FAIL"
        w.commit(config={"format": "gguf", "type": "Q4_1", "run": "base"}, status=status,
                 info={"summary": {"format": "gguf", "type": "Q4_1", "run": "base", "file": gguf.name,
                                   "parity": verdict}},
                 metrics={"parity": {"passed": status == "ready"}})


# -- waiting ---------------------------------------------------------------------------------
async def settle(app: ApplianceApp, pilot: Pilot[Any], rounds: int = 3, limit: int = 40) -> None:
    """Let workers finish and their results reach the screen: at least `rounds` rounds, then more
    until no worker is pending and two renderings in a row are the same (a loaded machine can need
    more rounds; results start new reads; under load a DataTable's header widths were seen to lag
    its rows by a round). A DirectoryTree's loader is a worker that never ends: it
    is not waited for."""
    previous = None
    for i in range(limit):
        await pilot.pause(0.02)  # a real pause: widgets finish some work on idle (DataTable widths)
        pending = [w for w in app.workers if not w.is_finished and not isinstance(w.node, DirectoryTree)]
        for worker in pending:
            with contextlib.suppress(Exception):  # a failure is the app's to show
                await worker.wait()
        await pilot.pause()
        if i + 1 >= rounds and not pending:
            shot = app.export_screenshot()
            if shot == previous:
                return
            previous = shot


async def wait_for(pilot: Pilot[Any], condition: Callable[[], bool], timeout: float = 30.0,
                   what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.1)


def screen_text(app: ApplianceApp) -> str:
    """What the terminal shows, as plain text."""
    console = Console(width=app.size.width, height=app.size.height, file=io.StringIO(),
                      record=True, color_system=None, legacy_windows=False)
    console.print(app.screen._compositor.render_update(full=True,
                                                       screen_stack=app._background_screens))
    return console.export_text()


def check_snapshot(app: ApplianceApp, name: str, tmp_path: Path) -> None:
    svg = app.export_screenshot(title=name)
    path = SNAPSHOTS / f"{name}.svg"
    if os.environ.get("UPDATE_SNAPSHOTS") or not path.exists():
        if not os.environ.get("UPDATE_SNAPSHOTS"):
            raise AssertionError(f"no snapshot {path.name}: run with UPDATE_SNAPSHOTS=1 once, "
                                 "look at it, commit it")
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(svg, encoding="utf-8")
        (SNAPSHOTS / f"{name}.txt").write_text(screen_text(app), encoding="utf-8")
        return
    if svg != path.read_text(encoding="utf-8"):
        (tmp_path / f"{name}.svg").write_text(svg, encoding="utf-8")
        (tmp_path / f"{name}.txt").write_text(screen_text(app), encoding="utf-8")
        raise AssertionError(f"{name} differs from {path}; new rendering in {tmp_path} (text in "
                             f"{name}.txt vs snapshots/{name}.txt); UPDATE_SNAPSHOTS=1 accepts it")


# -- the fixed workspace -----------------------------------------------------------------------
SMOL_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
               "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
               "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
               "torch_dtype": "bfloat16"}


def add_model(ws: Workspace, name: str = MODEL) -> None:
    """A model record (SmolLM2's tokenizer and config, no weights) under `name`."""
    template = (TOKENIZER_DIR / "chat_template.jinja").read_text(encoding="utf-8")
    info = {"architecture": "LlamaForCausalLM", "family": "llama", "model_type": "llama",
            "parameters": 134515008, "dtype": "bfloat16", "context_length": 8192,
            "vocab_size": 49152, "tokenizer_size": 49152, "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>", "stop_token_ids": [2], "stop_tokens": ["<|im_end|>"],
            "chat_template": template, "supports_system": True, "gguf_file": "gguf/model.gguf"}
    with ws.writer("model", name) as w:
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "chat_template.jinja", "generation_config.json"):
            shutil.copy(TOKENIZER_DIR / file, w.path / file)
        (w.path / "config.json").write_text(json.dumps(SMOL_CONFIG, indent=2))
        w.commit(parents=[], config={"source": {"type": "default",
                                                "path": "/x/SmolLM2-135M-Instruct.Q4_1.gguf"}},
                 info={**info, "summary": {k: info[k] for k in ("architecture", "parameters",
                                                                "context_length", "dtype",
                                                                "vocab_size")}})


def dataset_file(folder: Path) -> Path:
    """Twelve conversations, a duplicate, and four lines that cannot be used."""
    rows = [json.dumps({"messages": [{"role": "user", "content": f"How do I reset device {i}?"},
                                     {"role": "assistant", "content": "Hold the button for "
                                      + "ten seconds, " * (1 + i % 4) + "then release it."}]})
            for i in range(12)]
    bad = ['{"messages": [', json.dumps({"messages": [{"role": "robot", "content": "beep"}]}),
           json.dumps({"messages": [{"role": "user", "content": ""},
                                    {"role": "assistant", "content": "?"}]}),
           json.dumps({"instruction": "no answer"})]
    path = folder / "support.jsonl"
    path.write_text("\n".join([*rows[:5], bad[0], rows[3], *rows[5:9], bad[1], bad[2],
                               *rows[9:], bad[3]]) + "\n", encoding="utf-8")
    return path


def _run(ws: Workspace) -> None:
    model, data = ws.get("model", MODEL), ws.get("dataset", DATASET)
    with ws.writer("run", RUN) as w:
        (w.path / "adapter").mkdir()
        (w.path / "adapter" / "adapter_config.json").write_text('{"r": 8}')
        w.commit(parents=[parent_ref(model), parent_ref(data)], config={"train": {"lora_r": 8}},
                 info={"summary": {"model": MODEL, "dataset": DATASET, "steps": 40}},
                 metrics={"steps": 40})


def _artifact(name: str, kind: str, ppl: float, increase: float, kl: float, agree: float,
              reasons: list[str], passed: bool | None) -> dict[str, Any]:
    return {"name": name, "kind": kind, "perplexity": ppl, "ppl_increase": increase, "kl": kl,
            "agreement": agree, "tokens_identical": None if passed is None else True,
            "threshold": {}, "passed": passed, "reasons": reasons}


EXPORTS = [  # name, type, parity summary, status, artifact row
    (f"{RUN}-merged", "float32, full base", "reference", "ready",
     _artifact("adapter (as trained)", "adapter", 5.93, 0.0012, 0.0031, 0.981, ["informational"],
               None)),
    (f"{RUN}-gguf-q8_0", "Q8_0", "pass", "ready",
     {**_artifact(f"{RUN}-gguf-q8_0", "q8_0", 5.96, 0.0055, 0.0039, 0.9734, [], True),
      "decode_tokens_per_s": 41.3, "decode_tokens": 32}),
    (f"{RUN}-gguf-q4_k_m", "Q4_K_M", "FAIL", "failed",
     _artifact(f"{RUN}-gguf-q4_k_m", "q4_k_m", 6.61, 0.1153, 0.1624, 0.7712,
               ["perplexity +11.53% > +6.00%", "KL 0.1624 > 0.12", "agreement 77.12% < 80%"],
               False)),
    (f"{RUN}-onnx-int4", "int4", "pass", "ready",
     {**_artifact(f"{RUN}-onnx-int4", "int4", 6.54, 0.1039, 0.1134, 0.8722, [], True),
      "decode_tokens_per_s": 37.8, "decode_tokens": 32}),
]
EXPORT_MIB = {"Q8_0": 14, "Q4_K_M": 10, "int4": 12}  # sparse files: sizes for the frontier, cheap to hash


def _exports(ws: Workspace) -> None:
    run = ws.get("run", RUN)
    for name, kind, verdict, status, row in EXPORTS:
        report = {"reference": {"name": f"{RUN}-merged", "perplexity": 5.927}, "conversations": 16,
                  "tokens": 939, "artifacts": [row], "passed": row["passed"] is not False}
        with ws.writer("export", name) as w:
            (w.path / "parity.json").write_text(json.dumps(report, indent=2))
            with (w.path / "artifact.bin").open("wb") as f:
                f.write(name.encode())
                f.truncate(EXPORT_MIB.get(kind, 0) << 20 or len(name))
            fmt = name.rsplit("-", 2)[-2] if "merged" not in name else "merged"
            w.commit(parents=[parent_ref(run)], config={"run": RUN, "format": fmt, "type": kind},
                     status=status,
                     info={"summary": {"format": fmt, "type": kind, "run": RUN, "parity": verdict}})


def train_events(steps: int = 40) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [{"type": "state", "state": "queued", "kind": "train"},
                                    {"type": "state", "state": "running"},
                                    {"type": "log", "message": "loading smollm2-135m-instruct (nf4)"},
                                    {"type": "eval", "step": 0, "eval_loss": 2.9, "perplexity": 18.17,
                                     "best": True}]
    for step in range(1, steps + 1):
        loss = 1.4 + 1.5 / (1 + step / 6) + (0.12 if step % 3 == 0 else -0.05 * (step % 2))
        events.append({"type": "progress", "done": step, "total": 100, "step": step,
                       "loss": round(loss, 5), "lr": 3e-4 * min(1.0, step / 10),
                       "grad_norm": 0.8, "tokens_per_s": 1534.5, "eta_s": (100 - step) * 4.5,
                       "gpu_mem_gib": 1.21})
        if step % 10 == 0:
            events.append({"type": "eval", "step": step, "eval_loss": round(2.9 - step / 40, 5),
                           "perplexity": 10.0, "best": True})
    return [{"ts": 1795000000.0 + i, **e} for i, e in enumerate(events)]


JOBS = [  # id, kind, state, message, params, events
    ("20261122-090000-selftest-ffeedd", "selftest", "cancelled", "cancelled by the operator",
     {"steps": 10}, [{"type": "state", "state": "cancelled", "message": "cancelled by the operator"}]),
    ("20261122-101500-import-model-a1b2c3", "import-model", "succeeded", "done", {"default": True},
     [{"type": "log", "message": "checking the GGUF"}, {"type": "state", "state": "succeeded",
                                                        "message": "done"}]),
    (TRAIN_JOB, "train", "running", "", {"model": MODEL, "dataset": DATASET, "name": "run-2"},
     train_events()),
    ("20261122-110000-export-0a1b2c", "export", "failed",
     "Not found: no run named 'old-run' in /srv/appliance", {"run": "old-run", "format": "gguf"},
     [{"type": "state", "state": "failed", "message": "Not found: no run named 'old-run'"}]),
]


def _jobs(ws: Workspace) -> None:
    with ws.connect() as db:
        db.executescript(jobs.JOBS_SQL)
        for job_id, kind, state, message, params, events in JOBS:
            minute = job_id.split("-")[1]
            db.execute("INSERT INTO jobs (id, kind, params, state, created, started, finished, "
                       "attempt, message) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)",
                       (job_id, kind, json.dumps(params), state, f"2026-11-22T{minute[:2]}:"
                        f"{minute[2:4]}:00+00:00", None, None, message))
            folder = jobs.job_dir(ws, job_id)
            folder.mkdir(parents=True)
            (folder / "events.jsonl").write_text(
                "".join(json.dumps({"ts": 1795000000.0, **e}) + "\n" for e in events))


EVAL = "support-before-after"
EVAL_ITEMS = [  # prompt, reference, answers of the base, the run and its Q8_0 GGUF
    ("How do I reset device 3?", "Hold the button for ten seconds, then release it.",
     "Unplug it.", "Hold the button for ten seconds, then release it.",
     "Hold the button for ten seconds, then release it."),
    ("How do I reset device 7?\nIt blinks red.", "Hold the button for ten seconds, ten seconds, "
     "then release it.", "Press the reset button for ten seconds, then release it.",
     "Hold the button for ten seconds, then release it.", "Hold it."),
    ("Where is the serial number?", "On the label under the stand.",
     "The serial number is on the label under the stand.", "On the label under the stand.",
     "On the label under the stand."),
    ("Can I use a USB-C charger?", "Yes, any 20 W USB-C charger works.",
     "Yes, a USB-C charger works.", "No.", "Yes, any 20 W USB-C charger works."),
    ("Why is the screen dim?", "Power saving is on: turn it off in Settings > Display.",
     "The screen is dim.", "Power saving is on: turn it off in Settings > Display.",
     "Power saving is on: turn it off in Settings."),
]
EVAL_TARGETS = [(MODEL, "model", "transformers", None), (RUN, "run", "transformers+peft", None),
                (f"{RUN}-gguf-q8_0", "export", "llama.cpp", "pass")]
EVAL_JUDGE = [  # per target after the base, per item: the judge's label in each order (A/B swapped)
    [("B", "A"), ("B", "A"), ("A", "B"), ("A", "B"), ("B", "B")],
    [("B", "A"), ("A", "B"), ("tie", "tie"), ("B", "A"), (None, None)],
]


def _judge(rows: list[dict[str, Any]]) -> Any:
    """The judge's verdicts on the fixed answers, through the stage's own verdict functions, and
    the judge's settings (the default rubric; the file is the Q8_0 export's)."""
    from appliance.stages.eval import judge, rubric

    for row, labels in zip(rows[1:], EVAL_JUDGE, strict=True):
        verdicts = [judge.item_verdict({"orders": [
            {"label": label, "p": {"A": 0.6, "B": 0.3, "tie": 0.1}} if label else
            {"label": None, "reason": "overflow"} for label in pair]}) for pair in labels]
        for entry, verdict in zip(row["items"], verdicts, strict=True):
            entry["judge"] = verdict
        row["judge"] = judge.summary(verdicts)
    return judge.JudgeSetup(f"{RUN}-gguf-q8_0", Path(f"{RUN}-gguf-q8_0.gguf"), "0" * 64, "pass",
                            rubric.load(""))


def add_eval(ws: Workspace, name: str = EVAL) -> None:
    """An eval artifact shaped as the eval stage writes it: fixed answers scored with the stage's
    own metrics, totals, deltas and flips from its own functions (`evaluate.build_report`), then
    written as `evaluate._commit` writes it (eval.json, report.md, items.jsonl, answers/)."""
    from appliance.stages.eval import evaluate, metrics, results
    from appliance.stages.eval.request import EvalRequest

    items = [{"messages": [{"role": "system", "content": "Answer in one short sentence."},
                           {"role": "user", "content": prompt}], "reference": reference}
             for prompt, reference, *_ in EVAL_ITEMS]
    references = [i["reference"] for i in items]
    tokenize = metrics.bleu_tokenizer(references)
    rows = []
    for t, (target, kind, runtime, parity) in enumerate(EVAL_TARGETS):
        answers = [row[2 + t] for row in EVAL_ITEMS]
        scores = [metrics.item_scores(a, r, tokenize) for a, r in zip(answers, references, strict=True)]
        totals = metrics.corpus_scores(answers, references, tokenize, scores)
        totals["ppl"], totals["tokens"] = 9.8 - 2.1 * min(t, 1) + 0.05 * t, 12.0 - t
        rows.append({"name": target, "kind": kind, "artifact": target, "runtime": runtime,
                     "parity": parity, "totals": totals, "stopped": len(items) - t,
                     "items": [{"answer": a, "tokens": len(a.split()), "reason": "stop",
                                "ppl": 9.0 + i, "scores": s}
                               for i, (a, s) in enumerate(zip(answers, scores, strict=True))]})
    request = EvalRequest(tuple(t[0] for t in EVAL_TARGETS), DATASET, limit=len(items),
                          max_new_tokens=48, name=name)
    data = {"kind": "dataset", "name": DATASET, "ref": parent_ref(ws.get("dataset", DATASET))}
    doc = evaluate.build_report(name, request, data, items, rows, tokenize, _judge(rows))
    with ws.writer("eval", name) as w:
        (w.path / "eval.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False))
        (w.path / "report.md").write_text(results.markdown(doc, items))
        (w.path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        (w.path / "answers").mkdir()
        w.commit(parents=[parent_ref(ws.get(kind, target)) for target, kind, *_ in EVAL_TARGETS],
                 config={**request.to_params(), "name": name},
                 info={"summary": {"targets": [t[0] for t in EVAL_TARGETS], "data": DATASET,
                                   "items": len(items)}},
                 metrics={r["name"]: {"totals": r["totals"], "deltas": r["deltas"]}
                          for r in doc["targets"]})


def build_fixed_workspace(root: Path) -> Workspace:
    """The snapshot workspace (see the module docstring); ~2 s, most of it the tokenizer."""
    ws = Workspace(root / "ws").ensure()
    add_model(ws)
    datasets.import_file(ws, dataset_file(root), ws.get("model", MODEL), name=DATASET,
                         eval_fraction=0.25)
    _run(ws)
    _exports(ws)
    add_eval(ws)
    _jobs(ws)
    return ws
