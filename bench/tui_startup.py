"""First paint of the TUI on a populated workspace (target: < 1 s), and when its data is shown.

Builds a workspace with many artifacts (models, datasets, runs, exports written through the real
ArtifactWriter, small files), 60 jobs and a running training job with 20,000 events, then starts the
TUI in a fresh process several times (the clock starts before the interpreter does, as in
bench/startup.py) and prints the median and worst of:
- first paint: the dashboard composed and drawn (what the operator sees first);
- dashboard data: the system probe, artifact counts and jobs read by the workers and shown;
- live view: switching to Train and showing that job's 20,000 events as a chart.

Usage: .venv/bin/python bench/tui_startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRAIN_JOB = "20261122-103000-train-bench0"
CODE = """
import sys, time
t0 = float(sys.argv[1])
from pathlib import Path
from appliance import offline; offline.install()
from appliance.workspace import Workspace
from tui.app import ApplianceApp, Settings

async def measure(pilot):
    app = pilot.app
    await pilot.pause()
    paint = time.time() - t0
    await app.workers.wait_for_complete()
    await pilot.pause()
    data = time.time() - t0
    t1 = time.time()
    app.open_training(sys.argv[3])
    while not (getattr(app.screen, "progress", None) and app.screen.progress.step >= 20000):
        await pilot.pause(0.01)
    live = time.time() - t1
    print(f"{paint:.3f} {data:.3f} {live:.3f}")
    app.exit()

app = ApplianceApp(Workspace(Path(sys.argv[2])), Settings(poll_s=0.05))
app.run(headless=True, size=(80, 24), auto_pilot=measure)
"""


def _artifact(ws: object, kind: str, name: str, summary: dict, parents: list | None = None) -> None:
    with ws.writer(kind, name) as w:  # type: ignore[attr-defined]
        (w.path / "data.json").write_text(json.dumps(summary))
        w.commit(parents=parents or [], config={}, info={"summary": summary})


def populate(root: Path) -> Path:
    from appliance import jobs
    from appliance.workspace import Workspace

    ws = Workspace(root / "ws").ensure()
    for i in range(12):
        _artifact(ws, "model", f"model-{i:02d}", {"architecture": "LlamaForCausalLM",
                                                  "parameters": 134515008, "context_length": 8192})
        _artifact(ws, "dataset", f"data-{i:02d}", {"model": f"model-{i:02d}", "form": "messages",
                                                   "train": 900, "eval": 100})
        _artifact(ws, "run", f"run-{i:02d}", {"model": f"model-{i:02d}", "steps": 200})
        for kind in ("merged", "gguf-q8_0", "gguf-q4_k_m", "onnx-int4"):
            _artifact(ws, "export", f"run-{i:02d}-{kind}", {"type": kind, "parity": "pass"})
    with ws.connect() as db:
        db.executescript(jobs.JOBS_SQL)
        for i in range(60):
            job_id = TRAIN_JOB if i == 59 else f"20261122-{i:06d}-selftest-bench{i:02d}"
            db.execute("INSERT INTO jobs (id, kind, params, state, created) VALUES (?, ?, '{}', ?, ?)",
                       (job_id, "train" if i == 59 else "selftest", "running" if i == 59 else
                        "succeeded", f"2026-11-22T10:{i:02d}:00+00:00"))
            jobs.job_dir(ws, job_id).mkdir(parents=True)
    events = jobs.job_dir(ws, TRAIN_JOB) / "events.jsonl"
    with open(events, "w", encoding="utf-8") as fh:
        for step in range(1, 20001):
            fh.write(json.dumps({"ts": 0, "type": "progress", "done": step, "total": 20000,
                                 "step": step, "loss": 3 - step / 10000, "lr": 1e-4,
                                 "tokens_per_s": 1000.0, "eta_s": 10.0}) + "\n")
    return ws.root


def run_once(home: Path) -> tuple[float, float, float]:
    out = subprocess.run([sys.executable, "-c", CODE, repr(time.time()), str(home), TRAIN_JOB],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    paint, data, live = map(float, out.stdout.strip().splitlines()[-1].split())
    return paint, data, live


def report(name: str, samples: list[float]) -> None:
    print(f"{name:48} median {statistics.median(samples) * 1000:7.0f} ms   "
          f"worst {max(samples) * 1000:7.0f} ms   ({len(samples)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as tmp:
        home = populate(Path(tmp))
        run_once(home)  # warm the page cache once
        samples = [run_once(home) for _ in range(runs)]
    report("TUI first paint (populated workspace, 80x24)", [s[0] for s in samples])
    report("dashboard data shown (workers done)", [s[1] for s in samples])
    report("Train live view of 20,000 events", [s[2] for s in samples])
    print("workspace: 12 models, 12 datasets, 12 runs, 48 exports, 60 jobs; "
          f"python {sys.version.split()[0]}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
