"""The QLoRA training job on CPU with a tiny Llama (NF4 through bitsandbytes' CPU path, LoRA
through peft): end to end, kill -9 + resume equivalence, cancel, and the run artifact."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest

from appliance import api, jobs, manifest
from appliance.demo import sample_dataset
from appliance.errors import ExitCode, NotFoundError
from appliance.progress import is_staged
from appliance.stages.datasets import importer as datasets
from appliance.workspace import Workspace

pytestmark = pytest.mark.integration
CONFIG = {"lora_r": 4, "lora_alpha": 8, "max_steps": 6, "batch_size": 2, "grad_accum": 2,
          "max_seq_len": 96, "warmup_steps": 1, "learning_rate": 1e-3, "eval_every": 3,
          "save_every": 2, "seed": 3}


def params(name: str, **overrides: object) -> dict:
    return {"model": "tiny", "dataset": "small", "config": {**CONFIG, **overrides},
            "source": "test", "name": name}


def losses(ws: Workspace, job_id: str) -> dict[int, float]:
    """The last loss logged for each step (a resumed job recomputes steps after its checkpoint)."""
    return {e["step"]: e["loss"] for e in jobs.read_events(ws, job_id)
            if e["type"] == "progress" and "loss" in e}


def wait(ws: Workspace, job_id: str, predicate, timeout: float = 300) -> jobs.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = jobs.get(ws, job_id)
        if predicate(job):
            return job
        time.sleep(0.1)
    pytest.fail(f"timed out; events: {jobs.read_events(ws, job_id)[-5:]}")


def test_training_run_end_to_end(train_ws: Workspace) -> None:
    job = jobs.submit(train_ws, "train", params("run-a"))
    assert api.run(train_ws, job.id).state == "succeeded", jobs.get(train_ws, job.id).message
    run = train_ws.get("run", "run-a")
    data = manifest.verify(run.path)
    assert {p["name"] for p in data["parents"]} == {"tiny", "small"}
    assert "adapter/adapter_model.safetensors" in data["files"]
    adapter = json.loads((run.path / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"]
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["steps"] == 6
    assert math.isclose(metrics["perplexity_before"], math.exp(metrics["eval_loss_before"]), rel_tol=1e-3)
    events = jobs.read_events(train_ws, job.id)
    evals = [e["step"] for e in events if e["type"] == "eval"]
    assert evals == [0, 3, 6]
    progress = [e for e in events if e["type"] == "progress" and not is_staged(e)]
    assert [e["step"] for e in progress] == [1, 2, 3, 4, 5, 6]
    assert all(e["tokens_per_s"] > 0 and e["grad_norm"] >= 0 and "eta_s" in e for e in progress)
    assert progress[0]["lr"] == pytest.approx(1e-3)  # warm-up of one step
    assert not list(train_ws.root.glob("runs/.staging-*"))
    small = train_ws.get("dataset", "small")
    _check_phases(events, run.name, sum(len(datasets.load_rows(small, split)) for split in ("train", "eval")))


def _check_phases(events: list[dict], run: str, conversations: int) -> None:
    """Every phase of a run says what it does (the stage protocol of `appliance.progress`), the
    number of steps is known before anything slow starts, and the last step's ETA still counts
    the final evaluation that follows it."""
    kinds = [e["type"] for e in events]
    start = events[kinds.index("train-start")]
    assert start["max_steps"] == 6 and start["step"] == 0 and start["attempt"] == 1
    assert kinds.index("train-start") < min(i for i, e in enumerate(events) if is_staged(e))
    staged = [e for e in events if is_staged(e)]
    assert all(e["max_steps"] == 6 and e["artifact"] == run and "step" not in e for e in staged)
    order = [e["stage"] for i, e in enumerate(staged)
             if i == 0 or (staged[i - 1]["stage"], staged[i - 1]["label"]) != (e["stage"], e["label"])]
    assert order == ["check-inputs", "tokenize", "load-model", "evaluate", "save-checkpoint",
                     "evaluate", "save-checkpoint", "evaluate", "save-checkpoint", "publish"]
    tokenize = [e for e in staged if e["stage"] == "tokenize"]
    assert tokenize[-1]["done"] == tokenize[-1]["total"] == conversations
    assert tokenize[-1]["unit"] == "conversations"
    evals: dict[str, list[dict]] = {}
    for e in staged:
        if e["stage"] == "evaluate":
            evals.setdefault(e["label"], []).append(e)
    assert list(evals) == ["evaluating before training", "evaluating at step 3",
                           "final evaluation (step 6)"]
    for run_events in evals.values():
        done = [e["done"] for e in run_events]
        assert done[0] == 0 and done == sorted(done) and run_events[-1]["unit"] == "batches"
        assert run_events[-1]["done"] == run_events[-1]["total"] > 0
    assert [e["label"] for e in staged if e["stage"] == "save-checkpoint"] == [
        f"saving checkpoint step-{s:07d}" for s in (2, 4, 6)]
    last_step = [e for e in events if e["type"] == "progress" and not is_staged(e)][-1]
    assert last_step["step"] == 6 and last_step["eta_s"] > 0  # the final evaluation is still to come


def test_kill_9_and_resume_gives_the_same_losses_as_a_straight_run(train_ws: Workspace) -> None:
    straight = jobs.submit(train_ws, "train", params("straight"))
    assert api.run(train_ws, straight.id).state == "succeeded"

    job = jobs.start(train_ws, "train", params("killed"))
    wait(train_ws, job.id, lambda j: max(losses(train_ws, job.id), default=0) >= 3)
    os.kill(jobs.get(train_ws, job.id).pid, signal.SIGKILL)
    assert wait(train_ws, job.id, lambda j: j.state == "interrupted").state == "interrupted"
    checkpoints = sorted(p.name for p in (jobs.job_dir(train_ws, job.id) / "work" / "checkpoints").iterdir())
    assert checkpoints and checkpoints[-1] in ("step-0000002", "step-0000004")

    jobs.resume(train_ws, job.id)
    assert wait(train_ws, job.id, lambda j: j.state in jobs.TERMINAL).state == "succeeded"
    resumed, reference = losses(train_ws, job.id), losses(train_ws, straight.id)
    assert sorted(resumed) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    logs = [e["message"] for e in jobs.read_events(train_ws, job.id) if e["type"] == "log"]
    assert any(m.startswith("resumed from step-") for m in logs)


def test_cancel_checkpoints_then_resume_finishes(train_ws: Workspace) -> None:
    job = jobs.start(train_ws, "train", params("cancelled", max_steps=40, save_every=100, eval_every=100))
    wait(train_ws, job.id, lambda j: max(losses(train_ws, job.id), default=0) >= 2)
    jobs.cancel(train_ws, job.id)
    assert wait(train_ws, job.id, lambda j: j.state in jobs.TERMINAL).state == "cancelled"
    saved = sorted((jobs.job_dir(train_ws, job.id) / "work" / "checkpoints").iterdir())
    assert saved, "cancel must leave a checkpoint even between save_every steps"
    step = json.loads((saved[-1] / "state.json").read_text())["loop"]["step"]
    assert 2 <= step < 40
    with pytest.raises(NotFoundError):
        train_ws.get("run", "cancelled")  # an unfinished run is not an artifact


def _tree(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_cancel_while_a_resumed_run_loads_its_model(train_ws: Workspace,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed run spends minutes loading its model on a small box, in code that never looks at
    the cancel flag: a cancel then must still stop it, and leave its checkpoints as they were."""
    import threading

    from appliance.stages.train import recipe as train

    real_step, real_load = train.Trainer._step, train.load_model
    job = jobs.submit(train_ws, "train", params("slow-load", max_steps=4, eval_every=100))
    flag = jobs.job_dir(train_ws, job.id) / "cancel"

    def step_then_cancel(self: train.Trainer, state: train.LoopState) -> dict:
        out = real_step(self, state)
        if state.step == 2:
            flag.touch()  # attempt 1 stops cooperatively, with a checkpoint of step 2
        return out

    monkeypatch.setattr(train.Trainer, "_step", step_then_cancel)
    assert api.run(train_ws, job.id).state == "cancelled"
    work = jobs.job_dir(train_ws, job.id) / "work"
    before = _tree(work / "checkpoints")
    assert [p.name for p in (work / "checkpoints").iterdir()] == ["step-0000002"]

    loading = threading.Event()

    def slow_load(*args: object, **kwargs: object) -> object:
        loading.set()
        time.sleep(60)  # never checks for a cancel, as from_pretrained does not
        raise AssertionError("the load was not interrupted")

    monkeypatch.setattr(train.Trainer, "_step", real_step)
    monkeypatch.setattr(train, "load_model", slow_load)
    jobs.resume(train_ws, job.id, detach=False)
    canceller = threading.Thread(target=lambda: loading.wait(120) and jobs.cancel(train_ws, job.id))
    canceller.start()
    stopped = api.run(train_ws, job.id)
    canceller.join()
    assert loading.is_set()
    assert stopped.state == "cancelled", stopped.message
    assert _tree(work / "checkpoints") == before  # nothing rewritten, nothing half-written
    assert not list(train_ws.root.glob("runs/.staging-*"))
    with pytest.raises(NotFoundError):
        train_ws.get("run", "slow-load")
    starts = [e for e in jobs.read_events(train_ws, job.id) if e["type"] == "train-start"]
    assert [(e["attempt"], e["step"]) for e in starts] == [(1, 0), (2, 2)]

    monkeypatch.setattr(train, "load_model", real_load)
    jobs.resume(train_ws, job.id, detach=False)
    assert api.run(train_ws, job.id).state == "succeeded"
    assert sorted(losses(train_ws, job.id)) == [1, 2, 3, 4]


def test_cancel_during_the_final_evaluation_resumes_to_the_same_run(
        train_ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final evaluation (minutes on a real model) stops at a cancel: the checkpoint of the
    last step is kept with that evaluation still owed, and the resumed job evaluates then
    publishes the same run as a job never cancelled."""
    from appliance.stages.train import recipe as train

    same = {"max_steps": 4, "eval_every": 2, "save_every": 2}
    straight = jobs.submit(train_ws, "train", params("straight", **same))
    assert api.run(train_ws, straight.id).state == "succeeded"

    job = jobs.submit(train_ws, "train", params("eval-cancel", **same))
    flag = jobs.job_dir(train_ws, job.id) / "cancel"
    real_evaluate, calls = train.evaluate, []

    def evaluate(*args: object, **kwargs: object) -> float:
        calls.append(1)
        if len(calls) == 3:  # before training, at step 2, and the final one at step 4
            flag.touch()
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", evaluate)
    assert api.run(train_ws, job.id).state == "cancelled"
    saved = jobs.job_dir(train_ws, job.id) / "work" / "checkpoints" / "step-0000004"
    assert json.loads((saved / "state.json").read_text())["loop"]["pending_eval"] is True
    with pytest.raises(NotFoundError):
        train_ws.get("run", "eval-cancel")

    monkeypatch.setattr(train, "evaluate", real_evaluate)
    jobs.resume(train_ws, job.id, detach=False)
    assert api.run(train_ws, job.id).state == "succeeded"

    def evals(job_id: str) -> dict[int, float]:
        return {e["step"]: e["eval_loss"] for e in jobs.read_events(train_ws, job_id) if e["type"] == "eval"}

    assert sorted(evals(job.id)) == [0, 2, 4]
    assert evals(job.id) == pytest.approx(evals(straight.id), rel=1e-5)
    metrics = [json.loads((train_ws.get("run", n).path / "metrics.json").read_text())
               for n in ("straight", "eval-cancel")]
    assert metrics[1] == pytest.approx(metrics[0], rel=1e-5)


def test_out_of_memory_keeps_the_checkpoint_and_says_what_to_change(
        train_ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated: the step after the step-2 checkpoint raises CUDA's OutOfMemoryError."""
    import torch

    from appliance.stages.train import recipe as train

    real_step = train.Trainer._step

    def step_then_oom(self: train.Trainer, state: train.LoopState) -> dict:
        if state.step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, state)

    monkeypatch.setattr(train.Trainer, "_step", step_then_oom)
    job = jobs.submit(train_ws, "train", params("oom"))
    failed = api.run(train_ws, job.id)
    assert failed.state == "failed"
    assert failed.message.startswith("Out of memory:")
    assert "batch_size 2 x max_seq_len 96" in failed.message and "step-0000002" in failed.message
    assert "smaller batch_size or max_seq_len" in failed.message and "appliance plan" in failed.message
    assert (jobs.job_dir(train_ws, job.id) / "work" / "checkpoints" / "step-0000002").is_dir()

    monkeypatch.setattr(train.Trainer, "_step", real_step)
    jobs.resume(train_ws, job.id, detach=False)
    assert api.run(train_ws, job.id).state == "succeeded"
    logs = [e["message"] for e in jobs.read_events(train_ws, job.id) if e["type"] == "log"]
    assert "resumed from step-0000002 (step 2)" in logs


def test_kill_9_and_resume_on_the_real_smollm2(model_workspace, tmp_path: Path) -> None:
    """The same equivalence on SmolLM2-135M (NF4 on the CPU), short sequences to keep it quick."""
    ws, model = model_workspace
    lines = sample_dataset().read_text(encoding="utf-8").splitlines()[:24]
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(lines) + "\n", encoding="utf-8")
    datasets.import_file(ws, small, model, name="small", eval_fraction=0.2)
    config = {**CONFIG, "max_steps": 5, "grad_accum": 1, "max_seq_len": 128, "eval_every": 100,
              "save_every": 2}
    p = {"model": model.name, "dataset": "small", "config": config, "source": "test"}
    straight = jobs.submit(ws, "train", {**p, "name": "straight"})
    assert api.run(ws, straight.id).state == "succeeded", jobs.get(ws, straight.id).message

    job = jobs.start(ws, "train", {**p, "name": "killed"})
    wait(ws, job.id, lambda j: max(losses(ws, job.id), default=0) >= 3)
    os.kill(jobs.get(ws, job.id).pid, signal.SIGKILL)
    wait(ws, job.id, lambda j: j.state == "interrupted")
    jobs.resume(ws, job.id)
    assert wait(ws, job.id, lambda j: j.state in jobs.TERMINAL).state == "succeeded"
    resumed, reference = losses(ws, job.id), losses(ws, straight.id)
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_chunked_loss_equals_the_models_own_loss(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch,
                                                 quantization: str) -> None:
    import torch

    from appliance.stages.train import recipe as train
    from appliance.stages.train.config import validate

    monkeypatch.setattr(train, "LOSS_CHUNK", 16)  # several chunks even on this short batch
    cfg = validate({"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "quantization": quantization})
    dtype = torch.bfloat16 if quantization == "nf4" else torch.float32
    model = train.load_model(tiny_llama, cfg, "cpu", dtype)
    model.train()
    labels = list(range(5, 60))
    labels[:20] = [-100] * 20  # a prompt: no logits needed there
    batch = train.collate([train.Example(list(range(5, 60)), labels),
                           train.Example(list(range(7, 40)), list(range(7, 40)))], pad_id=2)
    reference = model(**batch).loss
    total, count = train.causal_lm_loss(model, batch)
    assert count == (55 - 1 - 19) + (33 - 1)  # shifted labels that are not -100
    assert float(total / count) == pytest.approx(float(reference), rel=1e-5)
    (total / count).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_plan_and_train_commands_validate_before_queueing(train_ws: Workspace) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "appliance", "--home", str(train_ws.root), *args],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(root)})

    fits = cli("plan", "--model", "tiny", "--target", "t4-16gb")
    assert fits.returncode == 0 and "fits" in fits.stdout
    too_big = cli("plan", "--model", "tiny", "--target", "t4-16gb", "--set", "batch_size=4096",
                  "--set", "max_seq_len=1024")
    assert too_big.returncode == 1 and "does NOT fit" in too_big.stdout
    bad = cli("train", "--model", "tiny", "--dataset", "small", "--set", "lora_r=0",
              "--set", "learning_rate=fast")
    assert bad.returncode == ExitCode.INVALID  # a bad value, not a bad command line
    assert "2 problem(s)" in bad.stderr and "lora_r" in bad.stderr and "learning_rate" in bad.stderr
    assert jobs.list_jobs(train_ws) == []  # nothing was queued


def test_cuda_graphs_on_the_cpu_train_eagerly_and_say_so(train_ws: Workspace) -> None:
    """`cuda_graphs = on` (with activation offload, which graphs hold too) is a CUDA setting: on the
    CPU the run trains as it would without it."""
    job = jobs.submit(train_ws, "train", params("graphs-cpu", cuda_graphs="on", max_steps=2,
                                                eval_every=2, save_every=2,
                                                offload_activations=True))
    assert api.run(train_ws, job.id).state == "succeeded", jobs.get(train_ws, job.id).message
    logs = [e["message"] for e in jobs.read_events(train_ws, job.id) if e["type"] == "log"]
    assert "cuda_graphs: nothing to capture on the CPU: steps run eagerly" in logs
    assert ("activation offload: nothing to move on the CPU (the inputs are in host memory)"
            in logs)
    assert sorted(losses(train_ws, job.id)) == [1, 2]
