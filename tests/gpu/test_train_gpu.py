"""The training job on a CUDA GPU: bf16 (or fp16 on a T4) compute, NF4 base, paged 8-bit AdamW,
kill -9 + resume. Skipped without CUDA (CI has none): run on a GPU host with
`python -m pytest tests/gpu -q -s`. Prints its figures (tokens/s, peak GPU memory)."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (none found)", allow_module_level=True)

from appliance import datasets, jobs, models  # noqa: E402
from appliance.demo import sample_dataset  # noqa: E402
from appliance.workspace import Workspace  # noqa: E402
from tests.conftest import build_random_llama  # noqa: E402

pytestmark = pytest.mark.gpu
SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192}
CONFIG = {"lora_r": 16, "lora_alpha": 32, "max_steps": 24, "batch_size": 8, "grad_accum": 1,
          "max_seq_len": 512, "warmup_steps": 2, "eval_every": 12, "save_every": 4, "seed": 1}


@pytest.fixture(scope="module")
def gpu_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("gpu")
    ws = Workspace(root / "ws")
    folder = build_random_llama(root / "smol-shape", **SMOLLM2_SHAPE)
    model = models.import_path(ws, folder, name="smol-shape")
    datasets.import_file(ws, sample_dataset(), model, name="dolly")
    return ws


def params(name: str) -> dict:
    return {"model": "smol-shape", "dataset": "dolly", "config": CONFIG, "source": "gpu-test",
            "name": name}


def progress(ws: Workspace, job_id: str) -> dict[int, dict]:
    return {e["step"]: e for e in jobs.read_events(ws, job_id) if e["type"] == "progress"}


def report(line: str) -> None:
    print(line)
    if out := os.environ.get("APPLIANCE_BENCH_OUT"):
        with open(Path(out) / "gpu-train.txt", "a") as fh:
            fh.write(line + "\n")


def test_training_runs_on_the_gpu(gpu_ws: Workspace) -> None:
    job = jobs.submit(gpu_ws, "train", params("gpu-run"))
    done = jobs.run(gpu_ws, job.id)
    assert done.state == "succeeded", done.message
    config = json.loads((gpu_ws.get("run", "gpu-run").path / "manifest.json").read_text())["config"]
    assert config["device"] == "cuda"
    major, _ = torch.cuda.get_device_capability()
    assert config["compute_dtype"] == ("torch.bfloat16" if major >= 8 else "torch.float16")
    steps = progress(gpu_ws, job.id)
    assert sorted(steps) == list(range(1, 25))
    rates = [steps[s]["tokens_per_s"] for s in range(5, 25)]
    peak = max(e["gpu_mem_gib"] for e in steps.values())
    report(f"{torch.cuda.get_device_name()}: SmolLM2-135M shape, NF4 + LoRA r=16, batch 8 x <=512, "
           f"paged AdamW 8-bit: median {statistics.median(rates):.0f} tokens/s (padded), "
           f"peak {peak:.2f} GiB; loss {steps[1]['loss']:.3f} -> {steps[24]['loss']:.3f}")


def test_kill_9_and_resume_on_the_gpu(gpu_ws: Workspace) -> None:
    straight = jobs.submit(gpu_ws, "train", params("straight"))
    assert jobs.run(gpu_ws, straight.id).state == "succeeded"
    job = jobs.start(gpu_ws, "train", params("killed"))
    deadline = time.monotonic() + 600
    while max(progress(gpu_ws, job.id), default=0) < 6 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(jobs.get(gpu_ws, job.id).pid, signal.SIGKILL)
    while jobs.get(gpu_ws, job.id).state != "interrupted" and time.monotonic() < deadline:
        time.sleep(0.2)
    jobs.resume(gpu_ws, job.id)
    while jobs.get(gpu_ws, job.id).state not in jobs.TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    assert jobs.get(gpu_ws, job.id).state == "succeeded"
    a, b = progress(gpu_ws, straight.id), progress(gpu_ws, job.id)
    worst = max(abs(a[s]["loss"] - b[s]["loss"]) / abs(a[s]["loss"]) for s in a)
    report(f"kill -9 at step >= 6 and resume: worst relative loss difference {worst:.2e} over 24 steps")
    assert worst < 1e-3


def test_fp16_with_loss_scaling_as_on_a_t4(gpu_ws: Workspace) -> None:
    """A T4 has no bf16: force fp16 compute and check the run learns (finite, falling loss)."""
    p = params("fp16")
    p["config"] = {**CONFIG, "compute_dtype": "fp16", "max_steps": 12, "eval_every": 12}
    job = jobs.submit(gpu_ws, "train", p)
    assert jobs.run(gpu_ws, job.id).state == "succeeded", jobs.get(gpu_ws, job.id).message
    steps = progress(gpu_ws, job.id)
    assert all(math.isfinite(e["loss"]) for e in steps.values())
    assert steps[12]["loss"] < steps[1]["loss"]
    report(f"fp16 + GradScaler: loss {steps[1]['loss']:.3f} -> {steps[12]['loss']:.3f} in 12 steps")
