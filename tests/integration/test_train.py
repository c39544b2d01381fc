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

from appliance import datasets, jobs, manifest
from appliance.demo import sample_dataset
from appliance.errors import NotFoundError
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
    return {e["step"]: e["loss"] for e in jobs.read_events(ws, job_id) if e["type"] == "progress"}


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
    assert jobs.run(train_ws, job.id).state == "succeeded", jobs.get(train_ws, job.id).message
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
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4, 5, 6]
    assert all(e["tokens_per_s"] > 0 and e["grad_norm"] >= 0 and "eta_s" in e for e in progress)
    assert progress[0]["lr"] == pytest.approx(1e-3)  # warm-up of one step
    assert not list(train_ws.root.glob("runs/.staging-*"))


def test_kill_9_and_resume_gives_the_same_losses_as_a_straight_run(train_ws: Workspace) -> None:
    straight = jobs.submit(train_ws, "train", params("straight"))
    assert jobs.run(train_ws, straight.id).state == "succeeded"

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


def test_out_of_memory_keeps_the_checkpoint_and_says_what_to_change(
        train_ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated: the step after the step-2 checkpoint raises CUDA's OutOfMemoryError."""
    import torch

    from appliance import train

    real_step = train.Trainer._step

    def step_then_oom(self: train.Trainer, state: train.LoopState) -> dict:
        if state.step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, state)

    monkeypatch.setattr(train.Trainer, "_step", step_then_oom)
    job = jobs.submit(train_ws, "train", params("oom"))
    failed = jobs.run(train_ws, job.id)
    assert failed.state == "failed"
    assert failed.message.startswith("Out of memory:")
    assert "batch_size 2 x max_seq_len 96" in failed.message and "step-0000002" in failed.message
    assert "smaller batch_size or max_seq_len" in failed.message and "appliance plan" in failed.message
    assert (jobs.job_dir(train_ws, job.id) / "work" / "checkpoints" / "step-0000002").is_dir()

    monkeypatch.setattr(train.Trainer, "_step", real_step)
    jobs.resume(train_ws, job.id, detach=False)
    assert jobs.run(train_ws, job.id).state == "succeeded"
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
    assert jobs.run(ws, straight.id).state == "succeeded", jobs.get(ws, straight.id).message

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

    from appliance import train
    from appliance.trainconfig import validate

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
    assert bad.returncode == 2
    assert "2 problem(s)" in bad.stderr and "lora_r" in bad.stderr and "learning_rate" in bad.stderr
    assert jobs.list_jobs(train_ws) == []  # nothing was queued
